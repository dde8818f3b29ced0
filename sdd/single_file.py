"""Single-file Stable Diffusion checkpoints: the original (CompVis / A1111 / ComfyUI) layout, in and out, offline.

One ``.safetensors`` file holds the UNet (``model.diffusion_model.*``), the VAE (``first_stage_model.*``) and the
text encoder (SD-1.x: ``cond_stage_model.transformer.text_model.*``, CLIP ViT-L; SD-2.x: ``cond_stage_model.model.*``,
OpenCLIP ViT-H with fused ``in_proj`` attention; SDXL: both of its encoders, ``conditioner.embedders.0.transformer.*``
CLIP-L and ``conditioner.embedders.1.model.*`` OpenCLIP bigG with its ``text_projection``). Such a file names no
architecture, so reading it needs a config:

1. ``model.single_file_config``: a diffusers model folder (configs alone suffice) or a shipped name
   (``shipped_configs()``);
2. else the file's own metadata: ``write_single_file`` embeds the diffusers configs (``sdd.configs``), so an export
   of any shape -- the tiny test model included -- reads back exactly;
3. else the shipped config of the family its keys show (``FAMILIES``: the text encoder's layout and width), from
   ``sdd/assets/single-file/<name>.json`` (SD-1.5; SD-2.1 768 px v-prediction, as diffusers also assumes; SDXL
   base 1.0).

Reading goes through diffusers' own converter, ``StableDiffusionPipeline.from_single_file`` with ``config=`` a local
folder and ``local_files_only=True``: never the hub. Writing is the inverse key map (diffusers -> original) of that
converter, checked against it in ``tests/test_single_file.py``. A family adds a ``Family`` entry: its detection key,
its text-encoder map and its shipped config.

SD-2.x's text encoder is written in the OpenCLIP layout with the 23 blocks diffusers keeps: SD-2 reads the
penultimate layer, so the original's last block (``resblocks.23``) and ``text_projection`` are never used and are
not written (diffusers' converter ignores them too).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Optional

import torch

from sdd.errors import UserError
from sdd.families import family as model_family
from sdd.files import atomic_path, to_json

CONFIG_DIR = str(resources.files("sdd") / "assets" / "single-file")
TOKENIZER_DIR = str(resources.files("sdd") / "assets" / "clip-tokenizer")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's CLIP-L
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP bigG
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
METADATA_KEY = "sdd.configs"  # the diffusers configs, as JSON, in the safetensors header


def shipped_configs() -> list[str]:
    return sorted(n[: -len(".json")] for n in os.listdir(CONFIG_DIR) if n.endswith(".json"))


# --- text encoders: diffusers CLIPTextModel <-> the original layouts -------------------------------------------


def _text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``text_model.``-prefixed keys whether or not the installed transformers flattens CLIPTextModel (>= 5.6)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()
            if not k.endswith("position_ids")}


def clip_to_original(state: dict[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """SD-1.x: the HF CLIP layout under ``cond_stage_model.transformer.`` (SDXL's first encoder: ``prefix``)."""
    return {prefix + k: v for k, v in _text_model_keys(state).items()}


_OPEN_CLIP_NAMES = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """SD-2.x: OpenCLIP's layout under ``cond_stage_model.model.``, q/k/v fused into ``attn.in_proj_*`` (SDXL's
    second encoder: under ``prefix``, with its projection: OpenCLIP's ``text_projection`` is x @ P, the transpose of
    the diffusers ``text_projection.weight``)."""
    state = dict(state)
    projection = state.pop("text_projection.weight", None)
    state = {k[len("text_model."):]: v for k, v in _text_model_keys(state).items()}
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if projection is not None:
        out[prefix + "text_projection"] = projection.T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")])
            for old, new in _OPEN_CLIP_NAMES:
                out[f"{dst}{new}.{kind}"] = state.pop(f"{src}{old}.{kind}")
    if state:
        raise ValueError(f"text encoder keys with no OpenCLIP name: {sorted(state)[:3]}")
    return out


def sdxl_text_to_original(state: dict[str, torch.Tensor], state_2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL: CLIP-L under ``conditioner.embedders.0.transformer.``, OpenCLIP bigG (every layer: SDXL reads the
    penultimate hidden state itself, and the pooled output of the last) under ``conditioner.embedders.1.model.``."""
    return {**clip_to_original(state, XL_CLIP_PREFIX), **open_clip_to_original(state_2, XL_OPEN_CLIP_PREFIX)}


# --- families ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    text_key: str  # a key only this family's text encoder has; its last dimension is the text width
    text_width: int  # the width of the released models, which the shipped config describes
    config: str  # the shipped config for that width
    text_to_original: Callable[..., dict]  # one state dict per text encoder
    hidden_act: str  # what the diffusers text encoder of this family uses (tells the layout on export)
    pad_token: str  # the tokenizer's padding (OpenCLIP pads with "!", CLIP with end-of-text)
    model_family: str = "sd"  # its sdd.families name: the pipeline whose from_single_file reads it, how it encodes
    encoders: int = 1  # text encoders (SDXL: 2; the second pads with "!")


FAMILIES = [
    Family("SD-1.x", CLIP_PREFIX + "text_model.embeddings.token_embedding.weight", 768, "sd15", clip_to_original,
           "quick_gelu", "<|endoftext|>"),
    Family("SD-2.x", OPEN_CLIP_PREFIX + "token_embedding.weight", 1024, "sd21", open_clip_to_original, "gelu", "!"),
    Family("SDXL", XL_OPEN_CLIP_PREFIX + "token_embedding.weight", 1280, "sdxl", sdxl_text_to_original, "quick_gelu",
           "<|endoftext|>", "sdxl", encoders=2),
]


def detect(keys: dict[str, tuple[int, ...]], path: str = "checkpoint") -> tuple[Family, Optional[str]]:
    """The family of a checkpoint from its keys and shapes, and the shipped config that fits it (None when its text
    encoder's width is not the released models')."""
    if UNET_PREFIX + "input_blocks.0.0.weight" not in keys:
        raise UserError(f"model.pretrained: {path} is not a Stable Diffusion checkpoint (no {UNET_PREFIX}* keys)")
    for family in FAMILIES:
        if family.text_key in keys:
            width = keys[family.text_key][-1]
            return family, family.config if width == family.text_width else None
    raise UserError(f"model.pretrained: {path} holds no text encoder in a layout read here "
                    f"({CLIP_PREFIX}* for SD-1.x, {OPEN_CLIP_PREFIX}* for SD-2.x, {XL_OPEN_CLIP_PREFIX}* for SDXL; "
                    "an SDXL refiner is not read)")


def family_of(text_encoder, text_encoder_2=None) -> Family:
    """The family of a model's text encoder(s), for writing them back: two encoders are SDXL; one is told by its
    activation (OpenCLIP's GELU vs CLIP's quick GELU)."""
    act = text_encoder.config.hidden_act
    encoders = 1 if text_encoder_2 is None else 2
    for family in FAMILIES:
        if family.encoders == encoders and (encoders == 2 or family.hidden_act == act):
            return family
    raise UserError(f"export: a text encoder with hidden_act={act!r} has no single-file layout here")


# --- UNet and VAE: diffusers -> original ------------------------------------------------------------------------

_RESNET_NAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                 ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _unet_prefixes(config) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) for every block of a UNet2DConditionModel of this config."""
    per = config["layers_per_block"]
    n = len(config["block_out_channels"])
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2."),
             # SDXL's micro-conditioning and class-conditioned UNets (diffusers' converter maps both to label_emb)
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("class_embedding.linear_1.", "label_emb.0.0."), ("class_embedding.linear_2.", "label_emb.0.2.")]
    for b in range(n):
        for j in range(per):
            i = 1 + b * (per + 1) + j
            pairs += [(f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0."),
                      (f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1.")]
        pairs.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{1 + b * (per + 1) + per}.0.op."))
        has_attention = "CrossAttn" in config["up_block_types"][b]
        for j in range(per + 1):
            i = b * (per + 1) + j
            pairs += [(f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{i}.0."),
                      (f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{i}.1.")]
        pairs.append((f"up_blocks.{b}.upsamplers.0.conv.",
                      f"output_blocks.{b * (per + 1) + per}.{2 if has_attention else 1}.conv."))
    return pairs


def unet_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    pairs = _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        match = next(((d, o) for d, o in pairs if key.startswith(d)), None)
        if match is None:
            raise UserError(f"export: the UNet key {key} has no single-file name (an architecture this map lacks)")
        rest = key[len(match[0]):]
        if ".resnets." in match[0]:
            for new, old in _RESNET_NAMES:
                if rest.startswith(new + "."):
                    rest = old + rest[len(new):]
        out[UNET_PREFIX + match[1] + rest] = value
    return out


_VAE_ATTENTION_NAMES = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                        ("to_out.0.", "proj_out.")]


def vae_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.") for k in range(2)]
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                  (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                  (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    out = {}
    for key, value in state.items():
        match = next(((d, o) for d, o in pairs if key.startswith(d)), None)
        new_key = key if match is None else match[1] + key[len(match[0]):]
        if ".mid.attn_1." in new_key:
            head, rest = new_key.split(".mid.attn_1.")
            for new, old in _VAE_ATTENTION_NAMES:
                if rest.startswith(new):
                    rest = old + rest[len(new):]
            new_key = f"{head}.mid.attn_1.{rest}"
            if value.ndim == 2:  # the original's attention is made of 1x1 convolutions
                value = value[:, :, None, None]
        else:
            new_key = new_key.replace("conv_shortcut.", "nin_shortcut.")
        out[VAE_PREFIX + new_key] = value
    return out


# --- writing ----------------------------------------------------------------------------------------------------


def _config_dict(module) -> dict:
    from transformers import PretrainedConfig

    if isinstance(module, PretrainedConfig):  # every value, not only those that differ from the defaults
        return json.loads(module.to_json_string(use_diff=False))
    return json.loads(module.to_json_string())


def configs_of(unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2=None, tokenizer_2=None,
               force_zeros_for_empty_prompt: bool = True) -> dict:
    """The diffusers configs that rebuild these components (the shape of the shipped ``<name>.json``); SDXL's
    (``text_encoder_2``) add ``text_encoder_2``, ``tokenizer_2`` and the pipeline's ``force_zeros_for_empty_prompt``."""
    text = _config_dict(text_encoder.config)
    model_index = {
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", type(scheduler).__name__], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    configs = {"model_index": model_index, "unet": _config_dict(unet), "vae": _config_dict(vae),
               "text_encoder": text, "scheduler": _config_dict(scheduler),
               "tokenizer": {"pad_token": str(tokenizer.pad_token)}}
    if text_encoder_2 is not None:
        for key in ("requires_safety_checker", "safety_checker"):
            del model_index[key]
        model_index.update({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt":
                            bool(force_zeros_for_empty_prompt),
                            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                            "tokenizer_2": ["transformers", "CLIPTokenizer"]})
        configs.update({"text_encoder_2": _config_dict(text_encoder_2.config),
                        "tokenizer_2": {"pad_token": str(tokenizer_2.pad_token)}})
    return configs


def to_original(unet, vae, text_encoder, dtype: torch.dtype = torch.float32,
                text_encoder_2=None) -> dict[str, torch.Tensor]:
    """One state dict in the original layout: UNet, VAE and text encoder(s), as ``dtype`` on the CPU."""
    family = family_of(text_encoder, text_encoder_2)

    def plain(module):
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}

    out = unet_to_original(plain(unet), unet.config)
    out.update(vae_to_original(plain(vae), vae.config))
    encoders = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
    out.update(family.text_to_original(*[plain(e) for e in encoders]))
    return out


def write_config_folder(folder: str, configs: dict, tokenizer=None, tokenizer_2=None) -> None:
    """A diffusers model folder without weights: what ``from_single_file(path, config=folder)`` reads."""
    encoders = [e for e in ("text_encoder", "text_encoder_2") if e in configs]
    for part in ("unet", "vae", "scheduler", *encoders):
        os.makedirs(os.path.join(folder, part), exist_ok=True)
    files = {"model_index.json": configs["model_index"], "unet/config.json": configs["unet"],
             "vae/config.json": configs["vae"], "scheduler/scheduler_config.json": configs["scheduler"],
             **{f"{e}/config.json": configs[e] for e in encoders}}
    for name, value in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(to_json(value, indent=2) + "\n")
    for name, tok in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
        if tok is not None:
            tok.save_pretrained(os.path.join(folder, name))


def write_single_file(path: str, unet, vae, text_encoder, tokenizer, scheduler, *, dtype: torch.dtype,
                      config_folder: Optional[str] = None, text_encoder_2=None, tokenizer_2=None,
                      force_zeros_for_empty_prompt: bool = True) -> None:
    """Write the model as one ``.safetensors`` in the original layout, atomically (a temporary file beside ``path``
    renamed into place); its metadata carries the diffusers configs. ``config_folder``: also write those configs as
    the local folder diffusers' ``from_single_file(path, config=folder)`` needs. SDXL: ``text_encoder_2`` and
    ``tokenizer_2`` too."""
    from safetensors.torch import save_file

    configs = configs_of(unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2, tokenizer_2,
                         force_zeros_for_empty_prompt)
    state = to_original(unet, vae, text_encoder, dtype, text_encoder_2)
    metadata = {"format": "pt", "keys": "original", METADATA_KEY: to_json(configs)}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=metadata)
    if config_folder is not None:
        with atomic_path(config_folder) as tmp:
            write_config_folder(tmp, configs, tokenizer, tokenizer_2)


# --- reading ----------------------------------------------------------------------------------------------------


def _header(path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Key -> shape and the metadata of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            return keys, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error type for a file that is not one
        text = " ".join(str(err).split())[:160]
        raise UserError(f"model.pretrained: {path} is not a readable .safetensors file ({text})") from None


def check_path(path: str) -> None:
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise UserError(f"model.pretrained: {path} is a pickled checkpoint; pickles are never loaded - "
                        "convert it to .safetensors first")
    if not os.path.isfile(path):
        raise UserError(f"model.pretrained: no such file: {path}")


def _configs_for(path: str, keys, metadata, override: Optional[str]) -> tuple[Optional[dict], Optional[str]]:
    """(configs, None) or (None, a diffusers folder): what describes the checkpoint at ``path``."""
    family, shipped = detect(keys, path)
    if override:
        if os.path.isdir(override):
            if not os.path.isfile(os.path.join(override, "model_index.json")):
                raise UserError(f"model.single_file_config: {override} is not a diffusers model folder "
                                "(no model_index.json)")
            return None, override
        if override not in shipped_configs():
            raise UserError(f"model.single_file_config: {override!r} is neither a folder nor one of "
                            f"{shipped_configs()}")
        shipped = override
    elif METADATA_KEY in metadata:
        try:
            return json.loads(metadata[METADATA_KEY]), None
        except json.JSONDecodeError:
            raise UserError(f"model.pretrained: {path} carries unreadable configs ({METADATA_KEY}); "
                            "model.single_file_config names the right config") from None
    if shipped is None:
        width = keys[family.text_key][-1]
        raise UserError(f"model.pretrained: {path} is {family.name} with a text encoder of width {width}, which no "
                        f"shipped config describes; set model.single_file_config to its diffusers folder")
    with open(os.path.join(CONFIG_DIR, shipped + ".json"), encoding="utf-8") as f:
        return json.load(f), None


def _tokenizer(configs: Optional[dict], folder: Optional[str], name: str, pad_token: str):
    """The tokenizer ``name`` (``tokenizer``, ``tokenizer_2``): the configs' pad token over the shipped CLIP tables,
    the folder's own, or the family's padding."""
    from transformers import CLIPTokenizer

    if configs is not None:
        return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=configs.get(name, {}).get("pad_token", pad_token))
    if os.path.isdir(os.path.join(folder, name)):
        return CLIPTokenizer.from_pretrained(folder, subfolder=name)
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=pad_token)


def load_single_file(path: str, config: Optional[str] = None, *, with_vae: bool = True):
    """(unet, text_encoder, tokenizer, scheduler, vae, extra) from a single-file checkpoint, offline, in fp32;
    ``extra`` holds ``sdd.models.SDComponents``' other fields: the model family's name and, for SDXL,
    ``text_encoder_2``, ``tokenizer_2`` and ``force_zeros_for_empty_prompt``."""
    import diffusers

    check_path(path)
    keys, metadata = _header(path)
    family, shipped = detect(keys, path)
    configs, folder = _configs_for(path, keys, metadata, config)
    described_by = (f"the folder {folder}" if folder else f"the shipped {config}" if config
                    else "the configs it carries" if METADATA_KEY in metadata else f"the shipped {shipped}")
    _check_keys(path, keys, configs if configs is not None else _read_config_folder(folder), described_by)
    with tempfile.TemporaryDirectory(prefix="sdd-single-file-") as tmp:
        tokenizer = _tokenizer(configs, folder, "tokenizer", family.pad_token)
        components = dict(tokenizer=tokenizer)
        if family.encoders == 2:  # SDXL: the second tokenizer pads with "!"
            components["tokenizer_2"] = _tokenizer(configs, folder, "tokenizer_2", "!")
        else:
            components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if configs is not None:
            folder = tmp
            write_config_folder(folder, configs)
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
        scheduler_config = diffusers.DDIMScheduler.load_config(folder, subfolder="scheduler")
        scheduler = getattr(diffusers, scheduler_config.get("_class_name", "DDIMScheduler"),
                            diffusers.DDIMScheduler).from_config(scheduler_config)
        try:
            with warnings.catch_warnings(), _quiet_diffusers():
                warnings.simplefilter("ignore")
                pipe = model_family(family.model_family).pipeline_class().from_single_file(
                    path, config=folder, local_files_only=True, torch_dtype=torch.float32, scheduler=scheduler,
                    **components)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            text = " ".join(str(err).split())[:200]
            raise UserError(f"model.pretrained: could not read {path} as the model its config describes: "
                            f"{text}") from None
    extra = {"family_name": family.model_family}
    if family.encoders == 2:
        extra.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=components["tokenizer_2"],
                     force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
    for module in (pipe.unet, pipe.text_encoder, pipe.vae, extra.get("text_encoder_2")):
        if module is not None:
            module.eval()
            _check_loaded(path, module)
    return pipe.unet, pipe.text_encoder, tokenizer, scheduler, pipe.vae if with_vae else None, extra


def _read_config_folder(folder: str) -> dict:
    configs = {}
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        name = os.path.join(folder, part, "config.json")
        if part != "text_encoder_2" or os.path.isfile(name):
            with open(name, encoding="utf-8") as f:
                configs[part] = json.load(f)
    return configs


def original_shapes(configs: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape, in the original layout, of the model ``configs`` describe (built without weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        encoders = [CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))]
        if "text_encoder_2" in configs:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])))
    state = unet_to_original(unet.state_dict(), unet.config)
    state.update(vae_to_original(vae.state_dict(), vae.config))
    state.update(family_of(*encoders).text_to_original(*[e.state_dict() for e in encoders]))
    return {k: tuple(v.shape) for k, v in state.items()}


def _check_keys(path: str, keys: dict[str, tuple[int, ...]], configs: dict, described_by: str) -> None:
    """Every weight the config needs is in the file, with its shape (extra keys -- EMA copies, the noise schedule,
    OpenCLIP's unused last block -- are ignored, as diffusers does)."""
    expected = original_shapes(configs)
    missing = sorted(k for k in expected if k not in keys)
    if missing:
        raise UserError(f"model.pretrained: {path} lacks {len(missing)} weights needed by {described_by} "
                        f"(e.g. {missing[0]}); model.single_file_config names the right config")
    wrong = sorted(k for k in expected if keys[k] != expected[k])
    if wrong:
        raise UserError(f"model.pretrained: {path} does not fit {described_by}: {wrong[0]} is "
                        f"{list(keys[wrong[0]])}, the config needs {list(expected[wrong[0]])} "
                        f"({len(wrong)} such weights); model.single_file_config names the right config")


@contextlib.contextmanager
def _quiet_diffusers():
    """No progress bar and no advice about dtypes from diffusers while it reads one file."""
    from diffusers.utils import logging as diffusers_logging

    verbosity, bars_on = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars_on:
            diffusers_logging.enable_progress_bar()


def _check_loaded(path: str, module) -> None:
    """diffusers loads into empty (meta) tensors and leaves those the file lacks empty: name the first one."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_meta:
            raise UserError(f"model.pretrained: {path} lacks weights the config needs ({name} of the "
                            f"{type(module).__name__})")
