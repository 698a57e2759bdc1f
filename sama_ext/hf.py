"""`SamaTrainer`: SAMA meta learning inside `transformers.Trainer` — learned per-example weights
(a weight net on each example's loss) or learned per-domain mixture weights (one logit per data
source), judged by the loss on a clean / target `meta_dataset`.

    trainer = SamaTrainer(model=model, args=args, train_dataset=train, meta_dataset=clean,
                          weighting="sample")          # or "domain": a `domain` field per example
    trainer.train()
    trainer.learned_weights()                          # per training example, or {domain: weight}
    trainer.prune(keep=0.8)                            # the highest-weighted 80% of train_dataset

Where the meta step runs: the Trainer's `on_optimizer_step` point — right after the real
`optimizer.step()` and before the LR scheduler and `zero_grad`, as `sama_ext.meta_step` requires.
The optimiser handed to `meta_step` is the torch optimiser behind accelerate's wrapper. Only the
public `meta_step` and `frozen` are used (no internals), so the core does not need transformers.

Needs `pip install ".[hf]"` (transformers, accelerate). One process, or DDP under `torchrun`
(one device per process): the base model is the Trainer's DDP module, λ is wrapped in its own DDP
module with `sama_ext.distributed`'s comm hook, and λ.grad is the average over ranks of each rank's
meta-gradient (docs/huggingface.md, "DDP"). DeepSpeed, FSDP and DataParallel are refused.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from .frozen_inputs import frozen
from .sama_step import METHODS, meta_step

try:
    from transformers import Trainer, TrainerCallback
    from transformers.training_args import ParallelMode
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("sama_ext.hf needs transformers and accelerate: pip install 'sama_ext[hf]' "
                      f"(or pip install transformers accelerate): {e}") from e

__all__ = ["SamaTrainer", "WEIGHTINGS", "INDEX_KEY", "DOMAIN_KEY", "per_example_loss", "default_weight_net"]

WEIGHTINGS = ("sample", "domain")
INDEX_KEY = "sama_index"    # added to each training example: its position in train_dataset
DOMAIN_KEY = "domain"       # read from each training example under weighting="domain"
STATE_FILE = "sama_meta.pt"  # in each checkpoint folder, next to optimizer.pt
TASKS = ("auto", "classification", "causal_lm")


def default_weight_net() -> nn.Module:
    """Meta-Weight-Net (as in the demo): per-example loss → weight in (0, 1)."""
    return nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid())


def _weighted_mean(losses: Tensor, weights: Tensor) -> Tensor:
    # Σ w·ℓ / Σ w: normalised, so λ cannot lower the loss by shrinking every weight
    return (weights * losses).sum() / weights.sum().clamp_min(1e-12)


PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


def _problem_type(logits: Tensor, labels: Tensor, problem_type: str | None) -> str:
    """problem_type as transformers' sequence-classification heads read it: the config's if set, else
    one output → regression, integer labels → single label, other labels → multi-label."""
    if problem_type is None:
        if logits.shape[-1] == 1:
            return "regression"
        if labels.dtype in (torch.long, torch.int):
            return "single_label_classification"
        return "multi_label_classification"
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"SamaTrainer: unknown problem_type {problem_type!r} (known: {', '.join(PROBLEM_TYPES)}); "
                         "pass per_example_loss_fn=(outputs, labels) -> one loss per example")
    return problem_type


def per_example_loss(logits: Tensor, labels: Tensor, task: str, *, problem_type: str | None = None,
                     label_smoothing: float = 0.0) -> Tensor:
    """One loss per example from the logits, in float32.

    classification, by `problem_type` (None: inferred as transformers' sequence-classification heads
    do — one output → regression, integer labels → single label, else multi-label):
    single_label_classification — cross-entropy of (B, C) logits against (B,) class labels;
    multi_label_classification — binary cross-entropy with logits against (B, C) multi-hot labels,
    averaged over the classes; regression — squared error averaged over the outputs.
    causal_lm: (B, T, V) logits predict the next token; the mean token cross-entropy of each sequence
    over its labels that are not -100 (a sequence with none gets 0).
    label_smoothing: as the Trainer's label_smoothing_factor, (1-ε)·NLL + ε·mean over classes of
    -log p (cross-entropy losses only)."""
    logits = logits.float()
    if task == "classification":
        kind = _problem_type(logits, labels, problem_type)
        if label_smoothing and kind != "single_label_classification":
            raise ValueError(f"SamaTrainer: label_smoothing_factor applies to single-label classification and "
                             f"causal LM, not {kind}; set it to 0")
        if kind == "single_label_classification":
            if labels.is_floating_point() or labels.numel() != logits.shape[0]:
                raise ValueError(f"SamaTrainer: single-label classification needs one integer class per example, "
                                 f"got labels {tuple(labels.shape)} {labels.dtype} for logits {tuple(logits.shape)}")
            return F.cross_entropy(logits, labels.reshape(-1), reduction="none", label_smoothing=label_smoothing)
        if labels.numel() != logits.numel():
            raise ValueError(f"SamaTrainer: {kind} needs labels of the logits' shape {tuple(logits.shape)}, got "
                             f"{tuple(labels.shape)}")
        target = labels.reshape(logits.shape)
        if kind == "regression":
            if not target.is_floating_point():
                raise ValueError(f"SamaTrainer: regression (one output, or problem_type='regression') needs float "
                                 f"labels, got {labels.dtype}; for classes give the model num_labels > 1")
            return (logits - target.float()).square().mean(-1)
        return F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none").mean(-1)
    if task == "causal_lm":
        target = labels[:, 1:]
        tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none", ignore_index=-100,
                              label_smoothing=label_smoothing)
        keep = (target != -100).to(tok.dtype)
        return (tok * keep).sum(1) / keep.sum(1).clamp_min(1)
    raise ValueError(f"per_example_loss: task must be 'classification' or 'causal_lm', not {task!r}")


def _causal_lm(model: nn.Module) -> bool:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    except ImportError:  # pragma: no cover
        names = set()
    cls = type(model).__name__
    return cls in names or cls.endswith(("ForCausalLM", "LMHeadModel"))


def _real_optimizer(opt):
    """The torch optimiser behind accelerate's AcceleratedOptimizer (which delegates step())."""
    while not isinstance(opt, torch.optim.Optimizer) or type(opt).__name__ == "AcceleratedOptimizer":
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            raise TypeError(f"SamaTrainer: cannot find the torch optimiser behind {type(opt).__name__}")
        opt = inner
    return opt


class _DomainWeights(nn.Module):
    """weighting="domain"'s λ as a module (DDP wraps modules): one logit per domain; forward gives
    each example's weight softmax(logits)[domain]·D."""

    def __init__(self, n_domains: int, device):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_domains, device=device))

    def forward(self, domain_ids: Tensor) -> Tensor:
        return torch.softmax(self.logits, 0)[domain_ids] * self.logits.numel()


class _Indexed(torch.utils.data.Dataset):
    """Each example as a dict with its position (INDEX_KEY) and, if given, its domain id in place
    of the domain's name (the collator needs numbers)."""

    def __init__(self, data, domain_ids: list[int] | None = None, drop_domain: bool = False):
        self.data, self.domain_ids, self.drop_domain = data, domain_ids, drop_domain

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        ex = dict(_example(self.data, i))
        ex[INDEX_KEY] = i
        if self.domain_ids is not None:
            ex[DOMAIN_KEY] = self.domain_ids[i]
        elif self.drop_domain:
            ex.pop(DOMAIN_KEY, None)
        return ex


def _example(data, i: int) -> Mapping:
    ex = data[i]
    if not isinstance(ex, Mapping):
        raise TypeError(f"SamaTrainer: example {i} is a {type(ex).__name__}; datasets must give dicts "
                        "(e.g. {'input_ids': ..., 'labels': ...}), as the Trainer's collators expect")
    return ex


class _MetaStepCallback(TrainerCallback):
    """Runs the meta step at the Trainer's on_optimizer_step point (after optimizer.step(),
    before the scheduler and zero_grad)."""

    def __init__(self, trainer: "SamaTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._reset_step()
        self.trainer._check_optimizer()
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._reset_step()
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()
        return control


class SamaTrainer(Trainer):
    """`transformers.Trainer` that learns data weights with SAMA meta steps.

    meta_dataset: the clean / target data, same format (same fields) as train_dataset.
    weighting: "sample" — a weight net (`weight_net=`, default 1→100→1 with a sigmoid; any module
      mapping (B, 1) losses to (B, 1) non-negative weights) on each example's loss, held fixed
      across θ ± εv through `sama_ext.frozen`; or "domain" — one learned logit per value of each
      training example's `domain` field, weights softmax(logits) (learned mixture weights).
    The base loss of a step is Σ w·ℓ / Σ w over each micro-batch (averaged over gradient
    accumulation micro-batches, as the Trainer does); the meta loss is the mean per-example loss
    on a meta batch. ℓ comes from the logits (`task`: "classification" — by the config's problem_type,
    as transformers' heads — "causal_lm" — mean token loss per sequence, ignoring -100 — or "auto"),
    or from `per_example_loss_fn(outputs, labels)`. args.label_smoothing_factor applies to the
    cross-entropies; `compute_loss_func=` is refused (one loss per batch cannot be weighted).
    meta_lr: the meta optimiser's (Adam) learning rate; `meta_optimizer=` (a function λ's parameters
    → optimiser, e.g. `lambda p: torch.optim.SGD(p, lr=0.1)`) replaces Adam.
    meta_every: a meta step every k optimiser steps. alpha, method: as in `sama_ext.meta_step`
    (`meta_step_kwargs` passes the rest). meta_batch_size: None — the whole meta set each meta step;
    else a random batch of that size (drawn from the meta step's number and args.seed, so a
    resumed run draws the same batches). Under DDP each rank's meta batch is its own: rank r of W
    takes the meta examples r, r+W, ... (None), or the r-th batch of one shared random permutation.
    meta_compression: under DDP, the comm hook's compression of λ's all-reduce (None, "bf16", "fp16").
    The meta step's base loss re-runs the step's micro-batches (3 forwards, 2 backwards to λ):
    its activation memory is that of all micro-batches of one optimiser step at once.
    """

    def __init__(self, *args, meta_dataset=None, weighting: str = "sample", meta_lr: float = 1e-3,
                 meta_every: int = 1, alpha: float = 1.0, meta_batch_size: int | None = None,
                 method: str = "sama", weight_net: nn.Module | None = None, task: str = "auto",
                 per_example_loss_fn: Callable | None = None, meta_optimizer: Callable | None = None,
                 meta_step_kwargs: dict | None = None, meta_compression: str | None = None, **kwargs):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"SamaTrainer: weighting must be one of {WEIGHTINGS}, not {weighting!r}")
        if method not in METHODS:
            raise ValueError(f"SamaTrainer: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if task not in TASKS:
            raise ValueError(f"SamaTrainer: task must be one of {TASKS}, not {task!r}")
        if not (isinstance(meta_every, int) and meta_every >= 1):
            raise ValueError(f"SamaTrainer: meta_every must be a positive int, got {meta_every!r}")
        if meta_batch_size is not None and not (isinstance(meta_batch_size, int) and meta_batch_size >= 1):
            raise ValueError(f"SamaTrainer: meta_batch_size must be None or a positive int, got {meta_batch_size!r}")
        if weighting == "domain" and weight_net is not None:
            raise ValueError("SamaTrainer: weight_net= is for weighting='sample'; weighting='domain' learns one "
                             "logit per domain")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("SamaTrainer: compute_loss_func= is not supported — SamaTrainer needs one loss per "
                             "example to weight; pass per_example_loss_fn=(outputs, labels) -> a (B,) tensor instead")
        super().__init__(*args, **kwargs)
        if per_example_loss_fn is not None and self.args.label_smoothing_factor:
            raise ValueError("SamaTrainer: label_smoothing_factor is not applied to a per_example_loss_fn's losses; "
                             "set it to 0 and smooth inside per_example_loss_fn")
        if self.train_dataset is None or meta_dataset is None:
            raise ValueError("SamaTrainer needs train_dataset= and meta_dataset= (the clean / target data)")
        self._check_parallelism()
        if self.distributed and method not in ("sama", "sama_na"):
            raise NotImplementedError(f"SamaTrainer: method={method!r} runs in one process only; under DDP use "
                                      "'sama' or 'sama_na'")
        self.weighting, self.meta_every, self.alpha, self.method = weighting, meta_every, alpha, method
        self.meta_batch_size, self.task, self.per_example_loss_fn = meta_batch_size, task, per_example_loss_fn
        self.meta_step_kwargs = dict(meta_step_kwargs or {})
        # our loss is a per-micro-batch mean: the Trainer must divide it by the GA steps, exactly once
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

        self.user_train_dataset = self.train_dataset
        for what, data in (("train_dataset", self.train_dataset), ("meta_dataset", meta_dataset)):
            if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
                raise TypeError(f"SamaTrainer: {what} must be map-style (len() and indexing: a list of dicts, a "
                                f"torch Dataset, a datasets.Dataset), not {type(data).__name__}; per-example "
                                "weights are indexed by position")
        n = len(self.user_train_dataset)
        self._check_same_format(self.user_train_dataset, meta_dataset)
        device = self.args.device
        if weighting == "domain":
            self.domain_names, ids = self._read_domains(self.user_train_dataset)
            self.train_dataset = _Indexed(self.user_train_dataset, ids)
            self.meta_module = _DomainWeights(len(self.domain_names), device)
            self.domain_logits = self.meta_module.logits
            self.weight_net = None
        else:
            self.domain_names = None
            self.train_dataset = _Indexed(self.user_train_dataset)
            net = weight_net if weight_net is not None else default_weight_net()
            self.weight_net = self.meta_module = net.to(device)
        self.meta_params = [p for p in self.meta_module.parameters() if p.requires_grad]
        self.meta_dataset = _Indexed(meta_dataset, drop_domain=True)
        if self.distributed and len(self.meta_dataset) < self.args.world_size:
            raise ValueError(f"SamaTrainer: meta_dataset has {len(self.meta_dataset)} examples for "
                             f"{self.args.world_size} ranks; each rank needs its own meta examples")
        # λ's DDP module (None in one process): its backward in pass 3 of a meta step all-reduces the
        # meta-gradient through sama_ext.distributed's hook. DDP broadcasts rank 0's λ here.
        self.meta_ddp = None
        if self.distributed:
            from . import distributed as sdist

            ids = [device.index] if device.type == "cuda" else None
            self.meta_ddp = DDP(self.meta_module, device_ids=ids)
            self.meta_comm = sdist.register_comm_hook(self.meta_ddp, compression=meta_compression)
        elif meta_compression is not None:
            raise ValueError("SamaTrainer: meta_compression= applies to DDP runs (world_size > 1) only")
        self.meta_optimizer = (meta_optimizer(self.meta_params) if meta_optimizer is not None
                               else torch.optim.Adam(self.meta_params, lr=meta_lr))
        # learned_weights(): per example, the sum and count of the weights its training steps gave it
        self._w_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self._w_count = torch.zeros(n, dtype=torch.float64, device=device)
        self.domain_weight_history: list[tuple[int, Tensor]] = []  # (optimiser step, softmax(logits))
        # the current optimiser step's micro-batches and (indices, weights): committed at on_optimizer_step,
        # dropped at on_step_begin / train begin (a step that failed part-way leaves nothing behind)
        self._step_inputs: list[dict] = []
        self._step_records: list[tuple[Tensor, Tensor]] = []
        self._in_training_step = False
        # since the last log, on the device (no sync until log()): Σ over meta steps of [1, meta loss, ε, ‖v‖,
        # skipped], and over the training examples' weights count, Σw, Σw², min, max
        self._log_meta: Tensor | None = None
        self._log_w: Tensor | None = None
        self._meta_cache = None
        self.add_callback(_MetaStepCallback(self))

    def _check_parallelism(self) -> None:
        """One process, or DDP (one device per process); refuse what the meta step does not handle."""
        a = self.args
        other = [name for name, on in (("DeepSpeed", self.is_deepspeed_enabled), ("FSDP", self.is_fsdp_enabled),
                                       ("FSDP (XLA)", getattr(self, "is_fsdp_xla_enabled", False)),
                                       ("parallelism_config (TP/CP/SP)", a.parallelism_config is not None)) if on]
        if other:
            raise NotImplementedError(f"SamaTrainer: {other[0]} is not supported; run one process or DDP (torchrun, "
                                      "one device per process). For FSDP2 see sama_ext.fsdp with a hand-written loop")
        if a.n_gpu > 1:
            raise NotImplementedError(f"SamaTrainer: DataParallel ({a.n_gpu} GPUs in one process) is not supported; "
                                      "launch one process per GPU with torchrun (DDP)")
        if a.world_size > 1 and a.parallel_mode != ParallelMode.DISTRIBUTED:
            raise NotImplementedError(f"SamaTrainer: {a.world_size} processes in parallel mode {a.parallel_mode}; "
                                      "only DDP (torchrun) is supported")
        self.distributed = a.world_size > 1
        if self.distributed and not dist.is_initialized():  # pragma: no cover - accelerate initialises it
            raise RuntimeError("SamaTrainer: world_size > 1 but torch.distributed is not initialised")

    # ----- data ---------------------------------------------------------------------------------
    @staticmethod
    def _check_same_format(train, meta) -> None:
        if len(meta) == 0:
            raise ValueError("SamaTrainer: meta_dataset is empty")
        a, b = _example(train, 0), _example(meta, 0)
        ka, kb = set(a) - {DOMAIN_KEY, INDEX_KEY}, set(b) - {DOMAIN_KEY, INDEX_KEY}
        if ka != kb:
            raise ValueError(f"SamaTrainer: meta_dataset must have the format of train_dataset: its examples have "
                             f"fields {sorted(kb)}, the training examples {sorted(ka)} (missing: {sorted(ka - kb)}, "
                             f"extra: {sorted(kb - ka)}). Tokenise both the same way.")

    @staticmethod
    def _read_domains(data) -> tuple[list, list[int]]:
        values = []
        for i in range(len(data)):
            ex = _example(data, i)
            if DOMAIN_KEY not in ex:
                raise ValueError(f"SamaTrainer: weighting='domain' reads each training example's {DOMAIN_KEY!r} "
                                 f"field (its data source), but example {i} has only {sorted(ex)}")
            d = ex[DOMAIN_KEY]
            values.append(d.item() if isinstance(d, Tensor) else d)
        names = sorted(set(values), key=lambda v: (str(type(v)), v))
        index = {v: k for k, v in enumerate(names)}
        return names, [index[v] for v in values]

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for key in (INDEX_KEY, DOMAIN_KEY):  # not model inputs, but the collator must keep them
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    def _meta_batch(self, number: int) -> dict:
        """Meta batch of meta step `number` on this rank: the whole meta set (under DDP each rank its
        share), or a draw that depends only on (args.seed, number, rank) — a resumed run draws the
        same batches."""
        n, rank, world = len(self.meta_dataset), self.args.process_index, self.args.world_size
        k = self.meta_batch_size
        if k is None or k >= n:  # the whole meta set (its share r, r+W, ... on rank r)
            if self._meta_cache is None:
                self._meta_cache = self._collate_meta(range(rank, n, world))
            return self._meta_cache
        # rank r takes the r-th k of one permutation (disjoint while W·k <= n, wrapping after)
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + number)
        perm = torch.randperm(n, generator=g)
        return self._collate_meta(perm[(torch.arange(k) + rank * k) % n].tolist())

    def _collate_meta(self, idx) -> dict:
        collate = self._get_collator_with_removed_columns(self.data_collator, description="meta")
        return self._prepare_inputs(collate([self.meta_dataset[i] for i in idx]))

    # ----- losses -------------------------------------------------------------------------------
    def _per_example(self, model, inputs: dict) -> tuple[Tensor, object]:
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        inputs.pop(INDEX_KEY, None)
        inputs.pop(DOMAIN_KEY, None)
        if labels is None:
            raise ValueError(f"SamaTrainer: the batch has no 'labels' (fields: {sorted(inputs)}); per-example "
                             "losses need them (a causal-LM collator sets labels from input_ids)")
        outputs = model(**inputs)
        if self.per_example_loss_fn is not None:
            per = self.per_example_loss_fn(outputs, labels)
        else:
            logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
            if not isinstance(logits, Tensor):
                raise TypeError(f"SamaTrainer: the model's output ({type(outputs).__name__}) has no 'logits'; "
                                "per-example losses are computed from logits — pass per_example_loss_fn="
                                "(outputs, labels) -> one loss per example for other heads")
            task = self.task
            if task == "auto":
                unwrapped = self.accelerator.unwrap_model(model)
                if logits.dim() == 2:
                    task = "classification"
                elif logits.dim() == 3 and _causal_lm(unwrapped):
                    task = "causal_lm"
                else:
                    raise ValueError(f"SamaTrainer: cannot tell the task of {type(unwrapped).__name__} (logits of "
                                     f"shape {tuple(logits.shape)}); pass task='classification' or 'causal_lm', "
                                     "or per_example_loss_fn=")
            config = getattr(self.accelerator.unwrap_model(model), "config", None)
            per = per_example_loss(logits, labels, task, problem_type=getattr(config, "problem_type", None),
                                   label_smoothing=self.args.label_smoothing_factor)
        if not (isinstance(per, Tensor) and per.dim() == 1 and per.shape[0] == labels.shape[0]):
            raise ValueError(f"SamaTrainer: per-example losses must be a 1-d tensor of batch size {labels.shape[0]}, "
                             f"got {tuple(per.shape) if isinstance(per, Tensor) else type(per).__name__}")
        return per, outputs

    def _weights(self, pers: list[Tensor], inputs: list[dict], module: nn.Module) -> list[Tensor]:
        """w(λ) for each example of each micro-batch (in float32: no autocast on the meta parameters),
        from ONE call of the meta module on all of them: under DDP each forward of λ's module arms
        its reducer for one backward."""
        with torch.autocast(device_type=pers[0].device.type, enabled=False):
            if self.weighting == "domain":
                w = module(torch.cat([b[DOMAIN_KEY] for b in inputs]))
            else:  # the weight net's input, held fixed across θ ± εv in a meta step
                z = torch.cat([frozen(per).float() for per in pers])
                w = module(z.unsqueeze(1)).squeeze(1).float()
        return list(w.split([per.shape[0] for per in pers]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        per, outputs = self._per_example(model, inputs)
        if not self._in_training_step:  # evaluation: the plain mean per-example loss
            loss = per.mean()
        else:
            if self.weighting == "domain" and DOMAIN_KEY not in inputs:
                raise ValueError(f"SamaTrainer: the training batch has no {DOMAIN_KEY!r} field; a custom "
                                 "data_collator must keep it (and 'sama_index')")
            with torch.no_grad():  # θ's gradient only; λ's comes from the meta step
                w = self._weights([per], [inputs], self.meta_module)[0]
            self._record(w, inputs)
            self._step_inputs.append(inputs)
            loss = _weighted_mean(per, w)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._in_training_step = True
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_training_step = False

    def _record(self, w: Tensor, inputs: dict) -> None:
        idx = inputs.get(INDEX_KEY)
        if idx is None:
            raise ValueError(f"SamaTrainer: the training batch has no {INDEX_KEY!r} field; a custom data_collator "
                             "must keep it")
        self._step_records.append((idx, w.detach().double()))

    def _reset_step(self) -> None:
        self._step_inputs, self._step_records = [], []

    def _commit_records(self, records: list[tuple[Tensor, Tensor]]) -> None:
        if not records:
            return
        idx, w = torch.cat([i for i, _ in records]), torch.cat([w for _, w in records])
        self._w_sum.index_add_(0, idx, w)
        self._w_count.index_add_(0, idx, torch.ones_like(w))
        stats = torch.stack([w.new_tensor(float(w.numel())), w.sum(), w.square().sum(), w.min(), w.max()])
        if self._log_w is None:
            self._log_w = stats
        else:
            old = self._log_w
            self._log_w = torch.cat([old[:3] + stats[:3], torch.minimum(old[3:4], stats[3:4]),
                                     torch.maximum(old[4:], stats[4:])])

    # ----- the meta step ------------------------------------------------------------------------
    def _check_optimizer(self) -> None:
        """method="sama" needs the optimiser's adaptation diagonal: refuse before θ takes a step."""
        if self.method == "sama":
            from .adaptation import require_diagonal

            require_diagonal(_real_optimizer(self.optimizer))

    def train(self, *args, **kwargs):
        self._reset_step()
        return super().train(*args, **kwargs)

    def _after_optimizer_step(self) -> None:
        step_inputs, records = self._step_inputs, self._step_records
        self._reset_step()
        self._commit_records(records)  # (also for a skipped step: its examples were weighted, as before)
        if self.accelerator.optimizer_step_was_skipped:  # (fp16 overflow) θ did not move: nothing to learn from
            return
        step = self.state.global_step + 1  # the step just taken (the Trainer counts it after the scheduler)
        if step % self.meta_every == 0 and step_inputs:
            self._meta_step(step, step_inputs)

    def _meta_step(self, step: int, step_inputs: list[dict]) -> None:
        model = self.model  # the forwards go to the model itself; meta_step holds the DDP reducers off
        opt = _real_optimizer(self.optimizer)
        theta = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        meta_batch = self._meta_batch(step // self.meta_every)
        ddp_kw = {}
        if self.distributed:
            base_module = self.model_wrapped
            if not isinstance(base_module, DDP):
                raise NotImplementedError(f"SamaTrainer: under {self.args.world_size} processes the Trainer wrapped "
                                          f"the model in {type(base_module).__name__}, not DistributedDataParallel; "
                                          "only DDP is supported (no torch.compile wrapper, no DeepSpeed/FSDP)")
            ddp_kw = dict(base_module=base_module, meta_module=self.meta_ddp)
        weigher = self.meta_ddp if self.distributed else self.meta_module

        def base_loss():
            with self.compute_loss_context_manager():
                pers = [self._per_example(model, inputs)[0] for inputs in step_inputs]
                ws = self._weights(pers, step_inputs, weigher)
                return sum(_weighted_mean(per, w) for per, w in zip(pers, ws)) / len(step_inputs)

        def meta_loss():
            with self.compute_loss_context_manager():
                return self._per_example(model, meta_batch)[0].mean()

        self.meta_optimizer.zero_grad(set_to_none=True)
        info = meta_step(theta, opt, self.meta_params, base_loss, meta_loss, alpha=self.alpha, method=self.method,
                         **ddp_kw, **self.meta_step_kwargs)
        self.meta_optimizer.step()
        row = torch.stack([torch.ones_like(info.eps, dtype=torch.float64)] + [
            x.detach().double().reshape(()) for x in (info.meta_loss, info.eps, info.v_norm, info.skipped)])
        self._log_meta = row if self._log_meta is None else self._log_meta + row
        if self.weighting == "domain":
            self.domain_weight_history.append((step, torch.softmax(self.domain_logits.detach(), 0).cpu()))

    # ----- logs ---------------------------------------------------------------------------------
    def _reduce_log_stats(self) -> None:
        """Under DDP: the statistics since the last log summed over ranks (min/max over ranks).
        A collective — the Trainer calls log() on every rank."""
        dev = self._w_sum.device
        meta = self._log_meta if self._log_meta is not None else torch.zeros(5, dtype=torch.float64, device=dev)
        w = self._log_w if self._log_w is not None else torch.tensor([0.0, 0.0, 0.0, math.inf, -math.inf],
                                                                      dtype=torch.float64, device=dev)
        sums = torch.cat([meta, w[:3]])
        dist.all_reduce(sums)
        lo, hi = w[3:4].clone(), w[4:].clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        self._log_meta = sums[:5] if sums[0] > 0 else None
        self._log_w = torch.cat([sums[5:], lo, hi]) if sums[5] > 0 else None

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self.distributed:
            self._reduce_log_stats()
        if self._log_meta is not None:
            n, loss, eps, v_norm, skipped = self._log_meta.tolist()
            logs.update({"meta_loss": loss / n, "meta_eps": eps / n, "meta_v_norm": v_norm / n,
                         "meta_skipped_frac": skipped / n})
            self._log_meta = None
        if self._log_w is not None:
            n, total, squares, lo, hi = self._log_w.tolist()
            mean = total / n
            var = max(squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
            logs.update({"weight_mean": mean, "weight_std": math.sqrt(var), "weight_min": lo, "weight_max": hi})
            self._log_w = None
        if self.weighting == "domain" and "loss" in logs:
            for name, v in zip(self.domain_names, torch.softmax(self.domain_logits.detach(), 0).tolist()):
                logs[f"domain_weight/{name}"] = v
        super().log(logs, *args, **kwargs)

    # ----- checkpoints ----------------------------------------------------------------------------
    def _gathered_counts(self) -> tuple[Tensor, Tensor]:
        """Σ of weights and count of sightings per training example, over all ranks (each rank
        records the examples of its own shard). Under DDP a collective: every rank must call it."""
        if not self.distributed:
            return self._w_sum, self._w_count
        both = torch.stack([self._w_sum, self._w_count])
        dist.all_reduce(both)
        return both[0], both[1]

    def _meta_state(self) -> dict:
        w_sum, w_count = self._gathered_counts()
        state = {"meta_optimizer": self.meta_optimizer.state_dict(), "w_sum": w_sum, "w_count": w_count,
                 "domain_weight_history": self.domain_weight_history, "weighting": self.weighting}
        if self.weighting == "domain":
            state["domain_logits"] = self.domain_logits.detach()
            state["domain_names"] = self.domain_names
        else:
            state["weight_net"] = self.weight_net.state_dict()
        return state

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        state = self._meta_state()  # (every rank: the weight statistics are gathered first)
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SamaTrainer: {path} not found; resume from a checkpoint saved by SamaTrainer "
                                    "(the weight net / domain logits and the meta optimiser are saved there)")
        state = torch.load(path, map_location="cpu", weights_only=True)  # copied into place below
        if state["weighting"] != self.weighting:
            raise ValueError(f"SamaTrainer: the checkpoint has weighting={state['weighting']!r}, this trainer "
                             f"{self.weighting!r}")
        if self.weighting == "domain":
            if list(state["domain_names"]) != list(self.domain_names):
                raise ValueError(f"SamaTrainer: the checkpoint's domains {state['domain_names']} differ from the "
                                 f"training data's {self.domain_names}")
            with torch.no_grad():
                self.domain_logits.copy_(state["domain_logits"])
        else:
            self.weight_net.load_state_dict(state["weight_net"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        if state["w_sum"].shape != self._w_sum.shape:
            raise ValueError("SamaTrainer: the checkpoint was saved with a training set of another size")
        # the checkpoint holds the sums over all ranks: rank 0 takes them, the others start from 0, so
        # that the gathered sums (over ranks) stay right
        keep = self.args.process_index == 0
        self._w_sum.copy_(state["w_sum"] if keep else torch.zeros_like(self._w_sum))
        self._w_count.copy_(state["w_count"] if keep else torch.zeros_like(self._w_count))
        self.domain_weight_history = list(state["domain_weight_history"])

    # ----- results --------------------------------------------------------------------------------
    def learned_weights(self):
        """weighting="sample": a float64 CPU tensor aligned with train_dataset — each example's weight
        averaged over the training steps that saw it (NaN if none did). weighting="domain": a dict
        {domain: mixture weight} (softmax of the learned logits; sums to 1).
        Under DDP the per-example weights are gathered over the ranks (each trained on its own shard),
        so every rank gets all of train_dataset's — a collective: call it on every rank (as prune)."""
        if self.weighting == "domain":
            return dict(zip(self.domain_names, torch.softmax(self.domain_logits.detach(), 0).tolist()))
        w_sum, w_count = self._gathered_counts()
        count = w_count.cpu()
        return torch.where(count > 0, w_sum.cpu() / count.clamp_min(1), torch.full_like(count, math.nan))

    def prune(self, keep: float = 0.8):
        """The training examples with the highest learned weights (a fraction `keep`), in their
        original order: `dataset.select(indices)` when the dataset has `select` (🤗 datasets), else
        a `torch.utils.data.Subset`. Needs weighting="sample" and every example seen at least once."""
        if self.weighting != "sample":
            raise ValueError("SamaTrainer.prune: needs weighting='sample' (per-example weights); with domain "
                             "weighting use learned_weights() for the mixture")
        if not (0 < keep <= 1):
            raise ValueError(f"SamaTrainer.prune: keep must be in (0, 1], got {keep!r}")
        w = self.learned_weights()
        unseen = int(torch.isnan(w).sum())
        if unseen:
            raise ValueError(f"SamaTrainer.prune: {unseen} training examples were never seen in training (no "
                             "learned weight); train at least one epoch first")
        k = max(1, round(keep * len(w)))
        idx = torch.topk(w, k).indices.sort().values.tolist()
        data = self.user_train_dataset
        return data.select(idx) if hasattr(data, "select") else torch.utils.data.Subset(data, idx)
