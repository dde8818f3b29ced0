"""Human feedback inversion: labels -> reward model -> a learned token that stands for a concept.

`hfi.feedback` stores people's answers (binary labels or rankings of generated images) and exports them as a
`datasets.Dataset`; `hfi.label_app` is the web app they answer in (`hfi-label`, needs the `label` extra).
"""
