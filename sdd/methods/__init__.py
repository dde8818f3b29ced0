"""Every method, one module each: the pure math (with its equation), the settings, the config, the method class.

Fine-tuning methods (loop clients, ``sdd.loop.Method``): ``sdd`` (SDD), ``esd`` (ESD), ``hfi`` (HFI's token
inversion), ``reward`` (HFI's reward model), ``shapes_base`` (the ShapesWorld base model); ``registry`` names them.
Inference-time methods (``sdd.generation.Guidance``): ``sld``, ``sega``; ``inference`` runs any of them (and the
negative prompt) by name. ``common`` holds what the fine-tuning methods share (config sections, base model, text
embeddings, export); ``knobs`` the validation of the inference methods' settings.
"""
