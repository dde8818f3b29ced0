"""Human feedback inversion: labels -> reward model -> a learned token that stands for a concept.

- `hfi.feedback`: the feedback store (binary labels or rankings of generated images), exported as a
  `datasets.Dataset`; `hfi.label_app` is the web app people answer in (`hfi-label`, needs the `label` extra);
- `hfi.auto_feedback`: the same records from a detector, with simulated annotator noise (`hfi-autolabel`);
- `hfi.embeddings` + `hfi.reward`: the reward model, an MLP on frozen CLIP image embeddings, trained with MSE
  (binary) or Bradley-Terry (rankings) through the shared loop (`train/train_reward.py`);
- `hfi.inversion`: reward-weighted textual inversion of one new token (`train/train_hfi.py`), exported as a
  `learned_embeds.safetensors` that SDD, ESD, SLD and the negative-prompt baseline take as their concept;
- `hfi.loop`: the whole loop on ShapesWorld in one run (`hfi-loop`).
"""
