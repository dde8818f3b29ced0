"""Attacks on erased models: does the erasure hold against someone who tries?

Each attack takes the model under attack (and its inference-time defence, if any), the concept, a judge, a budget
and a seed; finds what it finds; and reports the attack success rate (ASR: the share of generated images in which
the judge sees the concept) with a 95 % Wilson interval, as a curve over the budget (``runner``):

- ``inversion`` (``concept-inversion``): textual inversion of one token on the erased model (Pham et al. 2024);
- ``prompt_search`` (``prompt-search``): white-box discrete prompt search, UnlearnDiffAtk (Zhang et al. 2024);
- ``ring_a_bell`` (``ring-a-bell``): black-box prompt search with the text encoder alone (Tsai et al. 2024);
- ``relearn``: a few fine-tuning steps on images of the concept;
- ``static``: the shipped adversarial prompt suites.

``common`` holds what they share: the target, images of the concept, the ASR measurement.
"""
