"""Human feedback inversion, the people's side: people (or a detector) label generated images, and the whole loop.

- ``hfi.label_app``: the web app people answer in (``hfi-label``, needs the ``label`` extra); answers go to the
  feedback store (``sdd.feedback``), exported as a ``datasets.Dataset``;
- ``hfi.auto_feedback``: the same records from a detector, with simulated annotator noise (``hfi-autolabel``);
- ``hfi.experiment``: the whole loop on ShapesWorld in one run (``hfi-loop``): images, feedback, reward model,
  token, SDD with the token and with the word, the benchmark.

HFI's two trained parts are methods like any other (``sdd.methods.reward``: the reward model on CLIP image
embeddings, ``sdd/embeddings.py``; ``sdd.methods.hfi``: reward-weighted textual inversion of the token), trained by
``train/train_reward.py`` and ``train/train_hfi.py``.
"""
