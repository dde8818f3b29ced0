"""SDD: Safe self-Distillation Diffusion (Kim et al., arXiv 2307.05977; ECCV'24 variant in arXiv 2407.21032).

    theta* <- theta;  c_s = enc(", ".join(concepts))
    repeat:  z_T ~ N(0, I);  k ~ U{0..K-1} (or floor(K * Beta(3, 3)));  c_p = one concept
             z_t, t = k CFG-DDIM steps of the EMA teacher theta* toward c_p (guidance s_g)
             loss = || eps_theta(z_t, c_s, t) - sg(eps_theta(z_t, emptyset, t)) ||^2
             theta* <- m theta* + (1 - m) theta
    export theta* (the teacher)

With ``sdd.preserve_prompts`` (not in the papers; off by default) the loss gains a preservation term on the same
latents, ``preserve_weight * || eps_theta(z_t, c_keep, t) - eps_orig(z_t, c_keep, t) ||^2``, where eps_orig is the
frozen model before training and c_keep cycles through the prompts to keep (e.g. the other colours when erasing
red): what the concept shares with them is held in place while the concept itself is sent to the unconditional.
``sdd.preserve_latents=own`` evaluates the term instead on latents the EMA teacher samples toward c_keep (the same
k, one more trajectory per trajectory): where the model goes when it draws the prompts to keep; ``both`` adds the
two terms, each at ``preserve_weight``.
``sdd.preserve_unconditional`` = mu > 0 adds ``mu * || eps_theta(z_keep, {}, t) - eps_orig(z_keep, {}, t) ||^2``
on those latents: classifier-free guidance subtracts the unconditional prediction (s - 1) times from every kept
prompt's, so it is held where the kept prompts are drawn and left free on the concept's (docs/METHODS.md 1.8e).

With ``sdd.negative_guidance`` = eta > 0 (not in the papers; 0 by default) the target moves away from the concept
along the frozen original's direction, ``sg eps_theta(z_t, c_rest) - eta (eps_orig(z_t, c_s) - eps_orig(z_t, c_rest))``
(ESD's negative guidance on SDD's latents; docs/METHODS.md section 1.8d).

With ``sdd.adversarial.every`` (robust SDD, after AdvUnlearn's bilevel training; not in the papers; off by
default) an inner attack runs every few optimizer steps: it learns the input embedding v of a new token so that the
student, prompted with it, predicts what the original model predicts for the concept on the teacher's latents,

    v* = argmin_v || eps_theta(z_t, c(v), t) - eps_orig(z_t, c_p, t) ||^2        (Adam, ``adversarial.steps``)

(the embedding-space analogue of Concept Inversion, which is what breaks plain SDD), and the loss gains
``adversarial.weight * || eps_theta(z_t, c(v*), t) - sg(eps_theta(z_t, c_rest, t)) ||^2``: conditionings that
bring the concept back are sent where the concept word's are, c_rest the template without the token ("a {}
circle" -> "a circle"; "{}" -> the empty prompt, SDD's own target; ``adversarial.target=unconditional`` always
the empty prompt; with ``sdd.negative_guidance`` the target steps away from the concept as the concept's does).
c(v) encodes each of ``adversarial.templates`` with the token; v* starts from the last one found (or the concept's
embedding at the first attack) and is kept in the checkpoint; ``adversarial.radius`` projects it back into a ball
(radius times the largest vocabulary row's norm) after every inner step. ``adversarial.gate`` keeps the term only on the
latents where c(v*) brings the student closer to eps_orig(z_t, c_p, t) than c_rest does (where the attack
succeeded).

``t`` is the grid timestep of the latent the student sees (the official code's k = 0 case, which ran the full
trajectory and then queried t ~ 990, does not exist here). ``concept_roles='official'`` swaps c_s and c_p as
the released code does for several concepts (see docs/METHODS.md section 1.4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from sdd import timing
from sdd.config import check
from sdd.errors import UserError
from sdd.export import ModelCard
from sdd.methods import common
from sdd.params import configure_trainable
from sdd.perf import apply_to_unet, ema_loop_, frozen_copy, sampling_autocast
from sdd.sampling import concept_indices, sample_k, sample_to_k

# --- the math (pure) -----------------------------------------------------------------------------------------


def sdd_loss(eps_concept: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """mean over elements of (eps(z_t, c_s, t) - sg(eps(z_t, emptyset, t)))^2, in fp32. On the model's own output:
    v for a v-prediction model, alpha_bar_t times this in epsilon; a flow model's v (SD3), (1 - sigma)^2 times this
    in epsilon (docs/METHODS.md section 10)."""
    return F.mse_loss(eps_concept.float(), eps_uncond.detach().float())


def away_from_concept(eps_orig_concept: torch.Tensor, eps_orig_rest: torch.Tensor, eta: float) -> torch.Tensor:
    """eta * (eps_orig(z_t, c_s, t) - eps_orig(z_t, c_rest, t)): what ``sdd.negative_guidance`` subtracts from SDD's
    target, the frozen original's concept direction (ESD's negative guidance, on SDD's latents and target)."""
    return eta * (eps_orig_concept - eps_orig_rest)


@torch.no_grad()
def ema_update_(teacher: list[torch.Tensor], student: list[torch.Tensor], decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, in place, for each pair."""
    if teacher:
        torch._foreach_lerp_(teacher, student, 1.0 - decay)


def erase_texts(concepts, templates, roles: str, concept_templates=None) -> tuple[list[str], list[str], list[str]]:
    """The prompts of SDD's roles: (student's c_s, teacher's c_p, targets), aligned by concept index. The papers'
    SDD (``templates == ["{}"]``): c_s = the concepts joined, c_p = one concept, no target texts (the empty
    prompt); ``official`` roles swap c_s and c_p. With templates, each template with the concepts in the same
    roles, its target the template without them ("a red {}" -> "a red"). ``concept_templates`` (concept -> its
    own templates; the others keep ``templates``): each concept alone in each of its templates, as c_s and c_p."""
    joined = ", ".join(concepts)

    def fill(template: str, text: str) -> str:
        return " ".join(template.replace("{}", text).split())

    if concept_templates:
        pairs = [(t, c) for c in concepts for t in concept_templates.get(c, templates)]
        alone = [fill(t, c) for t, c in pairs]
        return alone, list(alone), [fill(t, "") for t, _ in pairs]
    if list(templates) == ["{}"]:
        student, sampler = [joined], list(concepts)
        return (sampler, student, []) if roles == "official" else (student, sampler, [])

    student = [fill(t, joined) for t in templates for _ in concepts]
    sampler = [fill(t, c) for t in templates for c in concepts]
    targets = [fill(t, "") for t in templates for _ in concepts]
    return (sampler, student, targets) if roles == "official" else (student, sampler, targets)


# --- configuration -------------------------------------------------------------------------------------------


@dataclass
class AdversarialSettings:
    every: int = 0  # optimizer steps between inner attacks; 0: off (the papers' SDD)
    warmup: int = 0  # optimizer steps of plain SDD before the first attack
    steps: int = 10  # Adam steps of one inner attack on the adversarial embedding
    lr: float = 1e-2  # of the inner attack
    weight: float = 1.0  # of the adversarial term in the loss
    templates: list[str] = field(default_factory=lambda: ["{}"])  # prompts holding the adversarial token ({})
    # what c(v*) is sent to: the template without the token ("a {} circle" -> "a circle", "{}" -> the empty prompt),
    # or always the unconditional prediction
    target: Literal["template", "unconditional"] = "template"
    # the term only on the latents where the attack succeeded: c(v*) brings the student closer to the original's
    # concept prediction than the template without the token (false: on every latent, AdvUnlearn's)
    gate: bool = False
    # v* projected back into the ball of this radius after every inner step, in units of the largest norm of the
    # vocabulary's input embeddings (PGD's projection); null: unbounded (v* is warm-started and can wander far off
    # the vocabulary, measured on ShapesWorld at 20-40 times its norms)
    radius: Optional[float] = None

    def __post_init__(self) -> None:
        check(self.every >= 0 and self.warmup >= 0 and self.steps >= 1, "sdd.adversarial",
              "every >= 0, warmup >= 0 and steps >= 1")
        check(self.lr > 0 and self.weight >= 0, "sdd.adversarial", "lr > 0 and weight >= 0")
        check(self.radius is None or self.radius > 0, "sdd.adversarial.radius", f"must be > 0, got {self.radius}")
        check(len(self.templates) > 0 and all(t.count("{}") == 1 for t in self.templates),
              "sdd.adversarial.templates", "each template must contain {} once")


@dataclass
class SDDSettings:
    guidance_scale: float = 3.0  # s_g of the teacher's sampling toward c_p
    ddim_steps: int = 50  # K: the DDIM grid the teacher samples on
    k_distribution: Literal["uniform", "beta"] = "uniform"
    beta_a: float = 3.0
    beta_b: float = 3.0
    ema_decay: float = 0.999
    concept_roles: Literal["paper", "official"] = "paper"
    concept_schedule: Literal["iterative", "random"] = "iterative"
    export: Literal["teacher", "student"] = "teacher"
    resolution: Optional[int] = None  # image size; default: the model's
    preserve_prompts: list[str] = field(default_factory=list)  # predictions held at the frozen original's
    preserve_weight: float = 1.0  # lambda of the preservation term (used only with preserve_prompts)
    # where the preservation term is evaluated (not in the papers): "concept", on the latents the teacher sampled
    # toward the concept (the erasure's own batch); "own", on latents the teacher samples toward the prompts to keep
    # (one more trajectory per trajectory, same k), where the model goes when it draws them; "both", the term on
    # each set, each at lambda (docs/METHODS.md §1.8)
    preserve_latents: Literal["concept", "own", "both"] = "concept"
    # mu (not in the papers; 0: off): the loss gains mu * || eps_theta(z_keep, {}) - eps_orig(z_keep, {}) ||^2 on
    # latents the teacher samples toward the prompts to keep: the unconditional prediction, which classifier-free
    # guidance subtracts (s - 1) times from every kept prompt's, stays where it was along their trajectories, and is
    # left free along the concept's; docs/METHODS.md section 1.8e
    preserve_unconditional: float = 0.0
    # nu (not in the papers; 0: off; needs negative_guidance): on the concept's latents the unconditional prediction is
    # sent to the frozen original's minus the concept's step away, nu * || eps_theta(z_t, {}) - sg(eps_orig(z_t, {})
    # - away) ||^2, so the empty prompt, and any token that means nothing, stops drawing the concept at the base rate
    # the original draws it without being asked; docs/METHODS.md section 1.8e
    erase_unconditional: float = 0.0
    # prompts the concept is erased in ({} = the concept; not in the papers): the teacher samples toward each
    # template with the concept, the student's template with the concept is sent to the same template without it
    # ("a red {}": "a red circle" -> "a red"); ["{}"] is the papers' SDD (the concept -> the empty prompt)
    templates: list[str] = field(default_factory=lambda: ["{}"])
    # several concepts, each in its own prompts (not in the papers): concept -> templates ({red: ["{}"], circle:
    # ["{}", "a green {}"]}); each concept alone in each of its templates is c_s and c_p, sent to the template
    # without it; concepts not named keep ``templates`` (docs/METHODS.md section 1.8c)
    concept_templates: dict[str, list[str]] = field(default_factory=dict)
    adversarial: AdversarialSettings = field(default_factory=AdversarialSettings)
    # training latents from one teacher trajectory (not in the papers; 1: the paper's loop, one latent per
    # trajectory): R > 1 draws R values of k for each trajectory, runs it to the largest and takes its latent after
    # each, so a batch of B latents costs B / R trajectories; every latent's k has the same distribution as with 1
    latents_per_trajectory: int = 1
    # eta (not in the papers; 0: SDD's target): the target becomes sg eps_theta(z_t, c_rest) - eta (eps_orig(z_t, c_s)
    # - eps_orig(z_t, c_rest)) with the frozen original's concept direction (ESD's negative guidance), so the student
    # is sent past the template without the concept, away from it; docs/METHODS.md section 1.8d
    negative_guidance: float = 0.0

    def __post_init__(self) -> None:
        check(self.negative_guidance >= 0, "sdd.negative_guidance", f"must be >= 0, got {self.negative_guidance}")
        check(self.ddim_steps >= 1, "sdd.ddim_steps", f"must be >= 1, got {self.ddim_steps}")
        check(self.latents_per_trajectory >= 1, "sdd.latents_per_trajectory",
              f"must be >= 1, got {self.latents_per_trajectory}")
        check(0.0 <= self.ema_decay < 1.0, "sdd.ema_decay", f"must lie in [0, 1), got {self.ema_decay}")
        check(self.beta_a > 0 and self.beta_b > 0, "sdd.beta_a/beta_b", "must be > 0")
        check(self.preserve_weight >= 0, "sdd.preserve_weight", f"must be >= 0, got {self.preserve_weight}")
        check(all(p.strip() for p in self.preserve_prompts), "sdd.preserve_prompts", "a prompt is empty")
        check(self.preserve_latents == "concept" or bool(self.preserve_prompts), "sdd.preserve_latents",
              f"'{self.preserve_latents}' samples toward the prompts to keep; set sdd.preserve_prompts")
        check(self.preserve_unconditional >= 0, "sdd.preserve_unconditional",
              f"must be >= 0, got {self.preserve_unconditional}")
        check(self.preserve_unconditional == 0 or bool(self.preserve_prompts), "sdd.preserve_unconditional",
              "holds the unconditional prediction on the trajectories of the prompts to keep; set sdd.preserve_prompts")
        check(self.erase_unconditional >= 0, "sdd.erase_unconditional", f"must be >= 0, got {self.erase_unconditional}")
        check(self.erase_unconditional == 0 or self.negative_guidance > 0, "sdd.erase_unconditional",
              "sends the unconditional prediction along the concept's step away; set sdd.negative_guidance > 0")
        check(len(self.templates) > 0 and all(t.count("{}") == 1 for t in self.templates), "sdd.templates",
              "each template must contain {} once")
        for concept, templates in self.concept_templates.items():
            check(len(templates) > 0 and all(t.count("{}") == 1 for t in templates),
                  f"sdd.concept_templates.{concept}", "must be templates that each contain {} once")


@dataclass
class SDDConfig(common.FineTuningConfig):
    method: Literal["sdd"] = "sdd"
    output_dir: str = "outputs/sdd"
    sdd: SDDSettings = field(default_factory=SDDSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.train.batch_size % self.sdd.latents_per_trajectory == 0, "sdd.latents_per_trajectory",
              f"must divide train.batch_size ({self.train.batch_size}), got {self.sdd.latents_per_trajectory}")
        for concept in self.sdd.concept_templates:
            check(concept in self.concepts, f"sdd.concept_templates.{concept}",
                  f"is not one of concepts {list(self.concepts)}")


# --- the method ----------------------------------------------------------------------------------------------


class SDDMethod:
    """Student = the UNet being trained; teacher = its EMA, which samples the training latents and is exported."""

    def __init__(self, cfg: SDDConfig, device: torch.device | str = "cpu", process_index: int = 0,
                 num_processes: int = 1):
        self.cfg = cfg
        self.process_index, self.num_processes = process_index, num_processes
        self.base = common.load_base(cfg.model.pretrained, cfg.model.revision, device, cfg.learned_embeds,
                                     single_file_config=cfg.model.single_file_config)
        common.require_export(self.base, cfg.export)
        self.model = self.base.unet
        self.denoise = self.base.family.denoise  # one denoiser call of the model's family (sdd.families)
        self.trainable_names = configure_trainable(self.model, cfg.finetune, cfg.lora, self.base.family)
        self.model.train()
        self.teacher = frozen_copy(self.model, common.share_frozen(cfg.perf))
        # the model as it was, for the preservation term (shares the frozen tensors; costs the trainable ones)
        needs_original = (bool(cfg.sdd.preserve_prompts) or cfg.sdd.adversarial.every > 0
                          or cfg.sdd.negative_guidance > 0)
        self.original = frozen_copy(self.model, common.share_frozen(cfg.perf)) if needs_original else None
        apply_to_unet(self.model, cfg.perf, training=True)
        for frozen in (self.teacher, self.original):
            if frozen is not None:
                apply_to_unet(frozen, cfg.perf, training=False)
        teacher_params = dict(self.teacher.named_parameters())
        student_params = dict(self.model.named_parameters())
        self._ema_pairs = (
            [teacher_params[n] for n in self.trainable_names],
            [student_params[n] for n in self.trainable_names],
        )

        s = cfg.sdd
        student_texts, sampler_texts, target_texts = erase_texts(cfg.concepts, s.templates, s.concept_roles,
                                                                 s.concept_templates)
        self.student_texts, self.sampler_texts, self.target_texts = student_texts, sampler_texts, target_texts
        self.preserve_texts = list(s.preserve_prompts)
        self.texts = common.TextEmbeddings(self.base, ["", *student_texts, *sampler_texts, *self.preserve_texts,
                                                       *target_texts], cfg.perf.cache_text_embeddings)
        self.resolution = s.resolution or self.base.default_resolution
        self.scheduler = common.ddim_grid(self.base, s.ddim_steps, self.resolution)
        self.latent_shape = common.latent_shape(self.base, self.resolution)
        self.adversary = Adversary(self.base, s.adversarial, sampler_texts[0]) if s.adversarial.every else None

    def draw(self, micro_step: int, generator: torch.Generator):
        """A micro-step's random draws: initial noise z_T and concept index per teacher trajectory, teacher steps k
        per latent (shape (B,), or (B / R, R) with R = ``sdd.latents_per_trajectory`` > 1)."""
        s, batch = self.cfg.sdd, self.cfg.train.batch_size
        trajectories = batch // s.latents_per_trajectory
        z_T = torch.randn((trajectories, *self.latent_shape), generator=generator)
        k = sample_k(batch, s.ddim_steps, generator, s.k_distribution, (s.beta_a, s.beta_b))
        if s.latents_per_trajectory > 1:
            k = k.view(trajectories, s.latents_per_trajectory)
        offset = common.sample_offset(micro_step, self.process_index, self.num_processes, trajectories)
        n_concepts = max(len(self.student_texts), len(self.sampler_texts))
        return z_T, k, concept_indices(s.concept_schedule, n_concepts, trajectories, offset, generator)

    def sample_latents(self, model, z_T, k, idx):
        """z_t sampled by the EMA teacher toward c_p (``model``, the student, does not sample), its timesteps, and
        the conditionings the student needs (c_uncond, c_s), one per latent."""
        s = self.cfg.sdd
        c_uncond, c_p, c_s = self.conditioning(idx)
        z_t, t = self.teacher_sample(z_T, c_p, k)
        return z_t, t, c_uncond, c_s.repeat_interleave(s.latents_per_trajectory, 0)

    def teacher_sample(self, z_T, c_cond, k):
        """(z_t, t): the EMA teacher's guided partial sampling from ``z_T`` toward ``c_cond`` for ``k`` steps."""
        c_uncond = self.texts.get()[:1]
        with sampling_autocast(c_uncond.device, self.cfg.perf.teacher_precision):
            z_t, t = sample_to_k(self.teacher, self.scheduler, z_T.to(c_uncond.device), c_cond, c_uncond,
                                 self.cfg.sdd.guidance_scale, k, denoise=self.denoise,
                                 distilled=self.base.family.guidance_distilled)
        return z_t.float(), t

    def conditioning(self, idx: torch.Tensor):
        """(c_uncond, c_p, c_s) for concept indices ``idx``."""
        embeds = self.texts.get()
        n_s, n_p = len(self.student_texts), len(self.sampler_texts)
        c_student, c_sampler = embeds[1 : 1 + n_s], embeds[1 + n_s : 1 + n_s + n_p]
        return embeds[:1], c_sampler[idx % n_p], c_student[idx % n_s]

    def target_conditioning(self, idx: torch.Tensor) -> torch.Tensor:
        """What the student's concept prediction is sent to, per latent of concept indices ``idx``: the empty
        prompt's (one row, the papers' SDD) or, with ``sdd.templates``, each template without the concept."""
        embeds = self.texts.get()
        if not self.target_texts:
            return embeds[:1]
        rows = embeds[len(embeds) - len(self.target_texts):]
        return rows[idx % len(self.target_texts)].repeat_interleave(self.cfg.sdd.latents_per_trajectory, 0)

    def student_loss(self, model, z_t, t, c_uncond, c_s, away: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SDD's loss on the student: its concept prediction toward its own unconditional one (minus ``away``)."""
        batch = z_t.shape[0]
        c_uncond = c_uncond.expand(batch, -1, -1)
        if self.cfg.perf.student_passes == "batched":
            eps = self.denoise(model, torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([c_uncond, c_s]))
            eps_uncond, eps_concept = eps[:batch].detach(), eps[batch:]
        else:
            with torch.no_grad():
                eps_uncond = self.denoise(model, z_t, t, c_uncond)
            eps_concept = self.denoise(model, z_t, t, c_s)
        return sdd_loss(eps_concept, eps_uncond if away is None else eps_uncond.detach() - away)

    def away(self, z_t, t, c_rest, c_s) -> Optional[torch.Tensor]:
        """``sdd.negative_guidance``'s term from the frozen original (one batched call), or None when it is 0."""
        eta = self.cfg.sdd.negative_guidance
        if eta == 0:
            return None
        batch = z_t.shape[0]
        with torch.no_grad(), sampling_autocast(z_t.device, self.cfg.perf.teacher_precision):
            eps = self.denoise(self.original, torch.cat([z_t, z_t]), torch.cat([t, t]),
                               torch.cat([c_rest.expand(batch, -1, -1), c_s]))
        return away_from_concept(eps[batch:].float(), eps[:batch].float(), eta)

    def preserve_conditioning(self, micro_step: int) -> torch.Tensor:
        """The prompts to keep for micro-step ``micro_step``'s latents, round-robin over all processes (no draw)."""
        return self.keep_embeds()[self.keep_indices(micro_step, self.cfg.train.batch_size)]

    def keep_embeds(self) -> torch.Tensor:
        start = 1 + len(self.student_texts) + len(self.sampler_texts)
        return self.texts.get()[start : start + len(self.preserve_texts)]

    def keep_indices(self, micro_step: int, n: int) -> torch.Tensor:
        offset = common.sample_offset(micro_step, self.process_index, self.num_processes, n)
        return concept_indices("iterative", len(self.preserve_texts), n, offset, None)

    def sample_keep_latents(self, micro_step: int, generator: torch.Generator, k: torch.Tensor):
        """``sdd.preserve_latents=own``: latents the EMA teacher samples toward the prompts to keep, one trajectory
        per concept trajectory (its own z_T, drawn after ``draw``'s, and the same k), the prompts round-robin over
        trajectories and processes; returns (z_t, t, c_keep), c_keep the prompt of each latent's trajectory."""
        trajectories = k.shape[0]
        z_T = torch.randn((trajectories, *self.latent_shape), generator=generator)
        c_keep = self.keep_embeds()[self.keep_indices(micro_step, trajectories)]
        z_t, t = self.teacher_sample(z_T, c_keep, k)
        return z_t, t, c_keep.repeat_interleave(self.cfg.sdd.latents_per_trajectory, 0)

    def preserve_loss(self, model, z_t, t, c_keep) -> torch.Tensor:
        """The preservation term: the student's predictions for prompts to keep toward the frozen original's."""
        with torch.no_grad(), sampling_autocast(z_t.device, self.cfg.perf.teacher_precision):
            eps_original = self.denoise(self.original, z_t, t, c_keep)
        return sdd_loss(self.denoise(model, z_t, t, c_keep), eps_original)

    # the loop's interface

    def compute_loss(self, model, micro_step: int, generator: torch.Generator):
        z_T, k, idx = self.draw(micro_step, generator)
        with timing.region("sampling"):
            z_t, t, c_uncond, c_s = self.sample_latents(model, z_T, k, idx)
        c_rest = self.target_conditioning(idx)
        away = self.away(z_t, t, c_rest, c_s)
        loss = self.student_loss(model, z_t, t, c_rest, c_s, away)
        logs = {"k": k.float().mean().item()}
        if self.preserve_texts:
            s = self.cfg.sdd
            if s.preserve_latents != "concept" or s.preserve_unconditional > 0:
                with timing.region("sampling"):
                    z_keep, t_keep, c_keep = self.sample_keep_latents(micro_step, generator, k)
            keep = z_t.new_zeros(())
            if s.preserve_latents != "own":  # on the concept's latents
                keep = keep + self.preserve_loss(model, z_t, t, self.preserve_conditioning(micro_step))
            if s.preserve_latents != "concept":  # on the kept prompts' own
                keep = keep + self.preserve_loss(model, z_keep, t_keep, c_keep)
            # tensors, not floats: the loop reads them only when it logs (no device sync every step)
            logs.update({"loss_erase": loss.detach(), "loss_preserve": keep.detach()})
            loss = loss + s.preserve_weight * keep
            if s.preserve_unconditional > 0:
                hold = self.preserve_loss(model, z_keep, t_keep, c_uncond.expand(z_keep.shape[0], -1, -1))
                logs["loss_preserve_unconditional"] = hold.detach()
                loss = loss + s.preserve_unconditional * hold
        if self.cfg.sdd.erase_unconditional > 0:
            c_empty = c_uncond.expand(z_t.shape[0], -1, -1)
            with torch.no_grad(), sampling_autocast(z_t.device, self.cfg.perf.teacher_precision):
                eps_empty = self.denoise(self.original, z_t, t, c_empty).float()
            empty = sdd_loss(self.denoise(model, z_t, t, c_empty), eps_empty - away)
            logs["loss_erase_unconditional"] = empty.detach()
            loss = loss + self.cfg.sdd.erase_unconditional * empty
        if self.adversary is not None:
            a = self.cfg.sdd.adversarial
            idx = idx.repeat_interleave(self.cfg.sdd.latents_per_trajectory)  # the concept of each latent
            step = micro_step // self.cfg.train.gradient_accumulation_steps
            first_micro = micro_step % self.cfg.train.gradient_accumulation_steps == 0
            c_concept = self.conditioning(idx)[1]
            if first_micro and step >= a.warmup and (step - a.warmup) % a.every == 0:
                with timing.region("attack"):
                    logs["loss_attack"] = self.adversary.attack(self.model, self.original, z_t, t, c_concept)
            if self.adversary.found:
                c_adv, c_rest = self.adversary.conditioning(z_t.shape[0], micro_step)
                target = (c_uncond if a.target == "unconditional" else c_rest).expand(z_t.shape[0], -1, -1)
                if a.gate:
                    hit = self.adversary.succeeded(model, self.original, z_t, t, c_adv, c_rest, c_concept)
                    share = hit.float().mean()  # logged as a tensor, as the losses are (no sync every step)
                    logs["adversarial_gate"] = share
                    # the term over the latents where c(v*) brings the concept back, as a share of the batch
                    adv = (self.student_loss(model, z_t[hit], t[hit], target[hit], c_adv[hit],
                                             None if away is None else away[hit]) * share
                           if hit.any() else z_t.new_zeros(()))
                else:
                    # sent where the concept's own conditioning is sent: with negative guidance, past its target
                    adv = self.student_loss(model, z_t, t, target, c_adv, away)
                logs["loss_adversarial"] = adv.detach()
                loss = loss + a.weight * adv
        return loss, logs

    def after_optimizer_step(self) -> None:
        if self.cfg.perf.ema == "loop":
            ema_loop_(self.teacher, self.model, self.cfg.sdd.ema_decay)
        else:
            ema_update_(*self._ema_pairs, self.cfg.sdd.ema_decay)

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"teacher.{n}": p for n, p in zip(self.trainable_names, self._ema_pairs[0])}
        if self.adversary is not None and self.adversary.found:
            state["adversarial.embedding"] = self.adversary.vector.detach()
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in zip(self.trainable_names, self._ema_pairs[0]):
                p.copy_(state[f"teacher.{n}"])
            if self.adversary is not None and "adversarial.embedding" in state:
                self.adversary.load(state["adversarial.embedding"])

    def export_unet(self):
        return self.teacher if self.cfg.sdd.export == "teacher" else self.model

    def validation_images(self):
        prompts = common.default_prompts(self.cfg.concepts, self.cfg.tracking)
        return common.validation_images(self.base, self.export_unet(), prompts, self.cfg.tracking, self.resolution)

    def export(self, output_dir: str) -> dict[str, str]:
        cfg = self.cfg
        card = ModelCard(
            base_model=cfg.model.pretrained,
            method="SDD (safe self-distillation)",
            concepts=list(cfg.concepts),
            steps=cfg.train.steps,
            finetune=cfg.finetune,
            hyperparameters=common.hyperparameters(cfg, cfg.sdd),
            exported="EMA teacher" if cfg.sdd.export == "teacher" else "student",
        )
        return common.export_unet(output_dir, self.base, self.export_unet(), cfg, card)


class Adversary:
    """The inner attack of robust SDD: one token's input embedding v, learned so that the student prompted with it
    predicts the original model's prediction for the concept (see the module docstring)."""

    def __init__(self, base, settings: AdversarialSettings, concept_text: str):
        import copy

        if base.text_encoder_2 is not None:
            raise UserError("sdd.adversarial: the inner attack learns one text encoder's token embedding; models "
                            "with two or three (SDXL, SD3, FLUX) are not supported yet, set sdd.adversarial.every=0")
        self.base, self.settings = base, settings
        tokenizer = copy.deepcopy(base.tokenizer)  # the exported model's tokenizer never holds the token
        tokenizer.add_tokens(["<adversarial>"])
        self.slot = tokenizer.convert_tokens_to_ids("<adversarial>")
        prompts = [t.format("<adversarial>") for t in settings.templates]
        device = next(base.text_encoder.parameters()).device
        self.ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        from sdd.sampling import encode_prompts

        # each template without the token: what its adversarial conditioning is sent to (adversarial.target)
        self.rest = encode_prompts(base.tokenizer, base.text_encoder,
                                   [" ".join(t.format("").split()) for t in settings.templates])
        table = base.text_encoder.get_input_embeddings().weight.detach()
        words = base.tokenizer(concept_text, add_special_tokens=False).input_ids
        self.vector = table[words].float().mean(0).clone()  # the first attack starts from the concept's words
        # adversarial.radius in the table's units: the largest norm of a vocabulary row
        self.max_norm = None if settings.radius is None else settings.radius * table.float().norm(dim=1).max().item()
        self.found = False
        self._encoded: Optional[torch.Tensor] = None  # c(v*), encoded once per attack

    def load(self, vector: torch.Tensor) -> None:
        self.vector = vector.detach().clone().to(self.vector.device)
        self.found, self._encoded = True, None

    def encode(self, vector: torch.Tensor) -> torch.Tensor:
        from sdd.textual_inversion import substituted_embeddings

        with substituted_embeddings(self.base.text_encoder, {self.slot: vector}):
            return self.base.text_encoder(self.ids)[0]

    def attack(self, student, original, z_t, t, c_concept) -> torch.Tensor:
        """v <- argmin || eps_student(z_t, c(v)) - eps_orig(z_t, c_concept) ||^2 by Adam; returns the last loss."""
        s = self.settings
        with torch.no_grad():
            target = self.base.family.denoise(original, z_t, t, c_concept)
        v = self.vector.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([v], lr=s.lr)
        batch = z_t.shape[0]
        which = torch.arange(batch) % len(self.ids)
        for _ in range(s.steps):
            c = self.encode(v)[which]
            loss = F.mse_loss(self.base.family.denoise(student, z_t, t, c).float(), target.float())
            (grad,) = torch.autograd.grad(loss, [v])
            optimizer.zero_grad(set_to_none=True)
            v.grad = grad
            optimizer.step()
            if self.max_norm is not None:
                with torch.no_grad():
                    v.mul_(torch.clamp(self.max_norm / v.norm().clamp_min(1e-12), max=1.0))
        self.vector, self.found, self._encoded = v.detach(), True, None
        return loss.detach()

    @torch.no_grad()
    def succeeded(self, student, original, z_t, t, c_adv, c_rest, c_concept) -> torch.Tensor:
        """Per latent: does c(v*) bring the student closer to the original's concept prediction than the template
        without the token does (``adversarial.gate``)?"""
        denoise = self.base.family.denoise
        target = denoise(original, z_t, t, c_concept).float()

        def distance(c):
            return (denoise(student, z_t, t, c).float() - target).pow(2).flatten(1).mean(1)

        return distance(c_adv) < distance(c_rest)

    def conditioning(self, batch: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """c(v*) for the latents of a micro-step, the templates in turn, and their templates without the token."""
        if self._encoded is None:  # the text encoder is frozen: c(v*) changes only when v* does
            with torch.no_grad():
                self._encoded = self.encode(self.vector)
        c = self._encoded
        which = (torch.arange(batch) + micro_step * batch) % len(self.ids)
        return c[which], self.rest[which]
