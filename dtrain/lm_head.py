"""The LM head and the loss computed together, in chunks of tokens: never `tokens x vocab` at once.

A causal LM's logits are the largest tensor of a fine-tuning step: 2 x 2048 tokens of a Llama 3
vocabulary (128,256) are 1.96 GiB in fp32, and the loss keeps a log-softmax of the same size for
backward, then writes a gradient of the same size. What an objective needs from them is far
smaller: per token, the log-probability of its label (and, for label smoothing, the mean over the
vocabulary; for distillation, the KL to a teacher). So the head computes exactly that, a chunk of
`chunk_tokens` positions at a time (as torchtune's chunked output loss and Liger's fused linear
cross-entropy do), in plain PyTorch, so that it runs on any device and under every strategy:

  - `ChunkedLMHead` is the model's own `lm_head`, an nn.Linear whose class is swapped at load
    time (`install`): the same parameters, names and checkpoints. Without a request it returns
    logits as before (generation, export). An objective asks it for something with
    `head_outputs(model, batch, request)`: the request is handed to the head for one forward pass
    of the whole model, so that DDP, FSDP2 and ZeRO-3 gather, reduce and free its weight as they
    do for any forward (the head returns the request's answer in place of the logits).
  - A request is what an objective wants from the logits: `CrossEntropy` (summed, with label
    smoothing), `Scores` (per-token loss and prediction, for evaluation), `TokenLogprobs` (for the
    preference objectives), `Hidden` (a teacher's input to its head) and `Distillation` (the KL
    to a teacher's chunked logits plus the task loss). Each also computes its answer from full
    logits, for a model whose head cannot be chunked (model.logits=full, a head with adapters or
    logit soft-capping): the objectives ask the same way in both cases.

Where the loss is a sum over tokens of a function of each token's logits (cross-entropy,
distillation), the gradients are computed in the forward pass, chunk by chunk, and only scaled in
backward (the logits are computed once). Where it is not known yet how the per-token values will
be combined (the preference losses), the chunk's logits are computed again in backward, or, when
the head's weight is frozen (LoRA, QLoRA), each token's gradient with respect to its hidden
state is kept instead (hidden-size per token). The loss is always computed in fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.data.formats import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Config fields of architectures that change the logits after the head (Gemma's soft-capping,
# Cohere's logit_scale, Granite's logits_scaling): their heads are not chunked.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class ChunkedLMHead(nn.Linear):
    """A model's lm_head that answers an objective's request in chunks (see the module's docstring)."""

    chunk_tokens: int = 256
    request: "Request | None" = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.request is None:
            return super().forward(hidden)
        return self.request.chunked(hidden, self)

    @contextlib.contextmanager
    def answering(self, request: "Request") -> Iterator[None]:
        self.request = request
        try:
            yield
        finally:
            self.request = None


def chunkable(model: nn.Module) -> str | None:
    """Why `model`'s LM head cannot be chunked, or None when it can."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or type(head) not in (nn.Linear, ChunkedLMHead):
        return f"its output layer is a {type(head).__name__}, not a plain linear layer"
    config = getattr(model, "config", None)
    transforms = [name for name in LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if transforms:
        return f"its config transforms the logits after the head ({', '.join(transforms)})"
    return None


def install(model: nn.Module, chunk_tokens: int) -> bool:
    """Make `model`'s lm_head a ChunkedLMHead (in place; the parameters stay what they are);
    False when it cannot be (see `chunkable`)."""
    if chunkable(model) is not None:
        return False
    head = model.get_output_embeddings()
    head.__class__ = ChunkedLMHead
    head.chunk_tokens = chunk_tokens
    return True


def chunked_head(model: nn.Module) -> ChunkedLMHead | None:
    """The ChunkedLMHead of a model, through the strategies' wrappers (DDP, DeepSpeed: .module) and peft."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, ChunkedLMHead) else None


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's keyword arguments for a batch (padded rows, packed rows, or one flattened row)."""
    # Packed batches add position_ids (restarting per example) and a block-diagonal mask, or
    # (flattened, for flash-attention) no mask. No KV cache: nothing is generated here.
    inputs: dict[str, Any] = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "prefix_segments" in batch:  # groups sharing a prefix in one row (GRPO's prompts): sdpa_varlen's layout
        from dtrain.attention import shared_prefix_kwargs

        inputs.update(shared_prefix_kwargs(batch["prefix_segments"]))
    elif "attention_mask" not in batch and "position_ids" in batch and batch["input_ids"].shape[0] == 1:
        # Flattened: the example boundaries once per forward, in the keyword arguments that
        # flash-attention and sdpa_varlen take (each layer would otherwise derive them again).
        from dtrain.attention import varlen_kwargs  # (transformers' attention code: loaded only to run a model)

        inputs.update(varlen_kwargs(batch["position_ids"]))
    return inputs


def head_outputs(model: nn.Module, batch: dict[str, torch.Tensor], request: "Request") -> Any:
    """Run `model` on `batch` and return the request's answer: computed by a chunked head inside
    the forward pass, or from the full logits when the model's head is not chunked."""
    head = chunked_head(model)
    if head is None:
        return request.from_logits(model(**model_inputs(batch), use_cache=False).logits)
    with head.answering(request):
        raw = model(**model_inputs(batch), use_cache=False).logits
    return request.finish(raw)


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts (the next position's), IGNORE_INDEX at the last."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


# --------------------------------------------------------------------------------------
# Requests


class Request:
    """What an objective wants from the LM head's output for one forward pass."""

    def chunked(self, hidden: torch.Tensor, head: ChunkedLMHead) -> torch.Tensor:
        """Inside the head's forward: the answer from its input, a chunk of tokens at a time."""
        raise NotImplementedError

    def finish(self, raw: torch.Tensor) -> Any:
        """The answer from what `chunked` returned through the model's output."""
        return raw

    def from_logits(self, logits: torch.Tensor) -> Any:
        """The same answer from full logits (a head that is not chunked)."""
        raise NotImplementedError


@dataclass
class CrossEntropy(Request):
    """Next-token cross-entropy summed over the labelled positions (labels: the batch's, unshifted)."""

    labels: torch.Tensor
    label_smoothing: float = 0.0

    def chunked(self, hidden: torch.Tensor, head: ChunkedLMHead) -> torch.Tensor:
        targets = next_token_labels(self.labels).reshape(-1)
        return _SummedTokenLoss.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias,
                                      _CrossEntropyChunk(targets, self.label_smoothing), head.chunk_tokens)

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        logits, labels = logits[:, :-1].float(), self.labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum", label_smoothing=self.label_smoothing)


@dataclass
class Scores(Request):
    """For evaluation: each position's loss (0 where unlabelled) and predicted token, with the
    labels they score (all shifted: position t predicts token t + 1)."""

    labels: torch.Tensor

    def chunked(self, hidden: torch.Tensor, head: ChunkedLMHead) -> torch.Tensor:
        targets = next_token_labels(self.labels).reshape(-1)
        flat = hidden.reshape(-1, hidden.shape[-1])
        out = torch.empty(flat.shape[0], 2, dtype=torch.float32, device=flat.device)
        with torch.no_grad():
            for rows, logits in _chunk_logits(flat, head.weight, head.bias, head.chunk_tokens):
                t = targets[rows]
                nll = torch.logsumexp(logits, -1) - logits.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1)
                out[rows, 0] = torch.where(t != IGNORE_INDEX, nll, 0.0)
                out[rows, 1] = logits.argmax(-1).float()  # (exact: ids below 2^24)
        return out.view(*hidden.shape[:-1], 2)

    def finish(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token_loss": raw[:, :-1, 0], "predicted": raw[:, :-1, 1].long(), "labels": self.labels[:, 1:]}

    def from_logits(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, labels = logits[:, :-1].float(), self.labels[:, 1:]
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
        return {"token_loss": token_loss, "predicted": logits.argmax(-1), "labels": labels}


@dataclass
class TokenLogprobs(Request):
    """log p(label) at each position that has one (0 elsewhere), shifted like `Scores`; of the
    distribution softmax(logits / temperature) (GRPO scores what it sampled at that temperature).
    With `with_entropy`, each position's entropy of that distribution too (detached), left in
    `entropies` (shifted the same way)."""

    labels: torch.Tensor
    temperature: float = 1.0
    with_entropy: bool = False
    entropies: torch.Tensor | None = None

    def chunked(self, hidden: torch.Tensor, head: ChunkedLMHead) -> torch.Tensor:
        targets = next_token_labels(self.labels).reshape(-1)
        entropies = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device) if self.with_entropy else None
        logps = _TokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets,
                                     head.chunk_tokens, 1.0 / self.temperature, entropies)
        if entropies is not None:
            self.entropies = entropies.view(hidden.shape[:-1])[:, :-1]
        return logps.view(hidden.shape[:-1])

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        return raw[:, :-1]

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        logits, labels = logits[:, :-1].float() / self.temperature, self.labels[:, 1:]
        # log_softmax at the label only: logit - logsumexp, without a second vocabulary-sized tensor.
        log_z = torch.logsumexp(logits, -1)
        logps = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - log_z
        if self.with_entropy:
            with torch.no_grad():
                self.entropies = log_z - (torch.softmax(logits, -1) * logits).sum(-1)
        return logps * (labels != IGNORE_INDEX)


@dataclass
class TeacherOutput:
    """A frozen model's output for distillation: its full logits, or its head's input and weights."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    dtype: torch.dtype | None = None  # what its head's matmul ran in


@dataclass
class Hidden(Request):
    """A frozen model's (a teacher's) input to its head, and a copy of the head's weights: a
    sharding strategy frees its gathered weights after the forward pass."""

    output: TeacherOutput = field(default_factory=TeacherOutput)

    def chunked(self, hidden: torch.Tensor, head: ChunkedLMHead) -> torch.Tensor:
        self.output.dtype = _compute_dtype(hidden, head.weight)
        self.output.weight = head.weight.detach().clone()
        self.output.bias = None if head.bias is None else head.bias.detach().clone()
        return hidden

    def finish(self, raw: torch.Tensor) -> TeacherOutput:
        self.output.hidden = raw.detach()
        return self.output

    def from_logits(self, logits: torch.Tensor) -> TeacherOutput:
        return TeacherOutput(logits=logits.detach())


@dataclass
class Distillation(Request):
    """alpha x KL(teacher_T || student_T) x T^2 + (1 - alpha) x cross-entropy, summed over the
    labelled positions (dtrain.objectives.distillation)."""

    labels: torch.Tensor
    teacher: TeacherOutput
    alpha: float
    temperature: float
    label_smoothing: float = 0.0

    def chunked(self, hidden: torch.Tensor, head: ChunkedLMHead) -> torch.Tensor:
        targets = next_token_labels(self.labels).reshape(-1)
        chunk = _DistillationChunk(targets, self, self.teacher)
        return _SummedTokenLoss.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, chunk,
                                      head.chunk_tokens)

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        teacher = self.teacher.logits
        if teacher is None:  # a chunked teacher beside a student whose head is not: its logits in full
            teacher = F.linear(self.teacher.hidden, self.teacher.weight, self.teacher.bias)
        logits, teacher, labels = logits[:, :-1].float(), teacher[:, :-1].float(), self.labels[:, 1:]
        mask = labels != IGNORE_INDEX
        t = self.temperature
        teacher_logp = F.log_softmax(teacher / t, dim=-1)
        student_logp = F.log_softmax(logits / t, dim=-1)
        soft = ((teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1) * mask).sum() * t**2
        hard = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum", label_smoothing=self.label_smoothing)
        return self.alpha * soft + (1.0 - self.alpha) * hard


# --------------------------------------------------------------------------------------
# The chunked computations


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's, else the inputs' (as F.linear would)."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  chunk_tokens: int, dtype: torch.dtype | None = None,
                  scale: float = 1.0) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, fp32 logits of those rows, times `scale`) for each chunk of `flat` (tokens x hidden)."""
    dtype = dtype or _compute_dtype(flat, weight)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    for start in range(0, flat.shape[0], chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, flat.shape[0]))
        with torch.autocast(flat.device.type, enabled=False):  # (the dtype is chosen above, once)
            logits = F.linear(flat[rows].to(dtype), w, b).float()
        yield rows, logits if scale == 1.0 else logits * scale


class _CrossEntropyChunk:
    """A chunk's summed cross-entropy (with label smoothing, as F.cross_entropy computes it) and
    its gradient with respect to the chunk's logits."""

    def __init__(self, targets: torch.Tensor, label_smoothing: float):
        self.targets, self.smoothing = targets, label_smoothing

    def __call__(self, rows: slice, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.targets[rows]
        valid = (t != IGNORE_INDEX)
        log_z = torch.logsumexp(logits, -1, keepdim=True)
        probs = torch.exp(logits - log_z)
        picked = logits.gather(-1, t.clamp(min=0)[:, None]) - log_z
        eps, vocab = self.smoothing, logits.shape[-1]
        token_loss = -(1.0 - eps) * picked.squeeze(-1)
        if eps:
            token_loss = token_loss - eps * (logits.mean(-1) - log_z.squeeze(-1))
        # d loss / d logits = softmax - ((1 - eps) onehot(label) + eps / V), at the labelled positions
        grad = probs
        if eps:
            grad -= eps / vocab
        grad.scatter_add_(-1, t.clamp(min=0)[:, None], torch.full_like(picked, -(1.0 - eps)))
        grad *= valid[:, None]
        return (token_loss * valid).sum(), grad


class _DistillationChunk:
    """A chunk's alpha x KL(teacher_T || student_T) x T^2 + (1 - alpha) x cross-entropy, and its
    gradient with respect to the student's logits (the teacher's chunk computed here too)."""

    def __init__(self, targets: torch.Tensor, request: Distillation, teacher: TeacherOutput):
        self.ce = _CrossEntropyChunk(targets, request.label_smoothing)
        self.targets, self.alpha, self.t = targets, request.alpha, request.temperature
        self.teacher = teacher

    def teacher_logits(self, rows: slice, like: torch.Tensor) -> torch.Tensor:
        if self.teacher.logits is not None:
            return self.teacher.logits.reshape(-1, self.teacher.logits.shape[-1])[rows].float()
        hidden = self.teacher.hidden.reshape(-1, self.teacher.hidden.shape[-1])
        return next(_chunk_logits(hidden[rows], self.teacher.weight, self.teacher.bias, like.shape[0],
                                  self.teacher.dtype))[1]

    def __call__(self, rows: slice, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = (self.targets[rows] != IGNORE_INDEX)[:, None]
        t = self.t
        teacher_logp = F.log_softmax(self.teacher_logits(rows, logits) / t, dim=-1)
        student_logp = F.log_softmax(logits / t, dim=-1)
        teacher_p = teacher_logp.exp()
        soft = ((teacher_p * (teacher_logp - student_logp)).sum(-1, keepdim=True) * valid).sum() * t**2
        # d (KL x T^2) / d logits = T (softmax(student / T) - softmax(teacher / T))
        soft_grad = (student_logp.exp_() - teacher_p).mul_(t * self.alpha) * valid
        hard, hard_grad = self.ce(rows, logits)
        return self.alpha * soft + (1.0 - self.alpha) * hard, soft_grad.add_(hard_grad, alpha=1.0 - self.alpha)


class _SummedTokenLoss(torch.autograd.Function):
    """sum over tokens of a per-token loss of the head's logits, whose gradients are computed in
    the forward pass chunk by chunk (the loss is linear in the per-token terms), then scaled by
    the incoming gradient in backward: the logits are computed once and never held whole."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk_loss: Any,
                chunk_tokens: int) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = _compute_dtype(flat, weight)
        total = torch.zeros((), dtype=torch.float32, device=flat.device)
        grad_h = torch.empty_like(flat) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w = weight.to(dtype)
        for rows, logits in _chunk_logits(flat, weight, bias, chunk_tokens, dtype):
            loss, grad = chunk_loss(rows, logits)
            total += loss
            if need_h or need_w or need_b:
                _add_chunk_grads(grad.to(dtype), rows, flat, w, grad_h, grad_w, grad_b)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.float()
        if grad_h is not None:
            grad_h = grad_h * scale.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w.mul_(scale).to(ctx.dtypes[0])
        if grad_b is not None:
            grad_b = grad_b.mul_(scale).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None


class _TokenLogprobs(torch.autograd.Function):
    """log p(target) per token from the head's input (of softmax(scale x logits)), a chunk at a
    time, and optionally each token's entropy (into `entropies`). Backward recomputes each
    chunk's logits when the head's weights train; when they are frozen, the forward pass keeps
    each token's d logp / d hidden instead (hidden-size per token, no second matmul)."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_tokens: int, scale: float = 1.0,
                entropies: torch.Tensor | None = None) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        keep_grads = need_h and not (need_w or need_b)
        dtype = _compute_dtype(flat, weight)
        w = weight.to(dtype)
        logps = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        log_z = torch.empty_like(logps)
        grad_h = torch.empty_like(flat) if keep_grads else None
        for rows, logits in _chunk_logits(flat, weight, bias, chunk_tokens, dtype, scale):
            t = targets[rows]
            lz = torch.logsumexp(logits, -1)
            log_z[rows] = lz
            logps[rows] = (logits.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1) - lz) * (t != IGNORE_INDEX)
            if entropies is not None:
                entropies[rows] = lz - (torch.exp(logits - lz[:, None]) * logits).sum(-1)
            if keep_grads:
                grad_h[rows] = ((_logp_grad(logits, lz, t) * scale).to(dtype) @ w).to(flat.dtype)
        ctx.chunk_tokens, ctx.dtype, ctx.scale = chunk_tokens, dtype, scale
        ctx.save_for_backward(grad_h if keep_grads else flat, weight, bias, targets, log_z)
        ctx.keep_grads = keep_grads
        return logps

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        saved, weight, bias, targets, log_z = ctx.saved_tensors
        if ctx.keep_grads:
            return saved * grad_out[:, None].to(saved.dtype), None, None, None, None, None, None
        flat, dtype = saved, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(flat) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w = weight.to(dtype)
        for rows, logits in _chunk_logits(flat, weight, bias, ctx.chunk_tokens, dtype, ctx.scale):
            # d logp / d raw logits = scale x (onehot - softmax(scale x logits))
            grad = (_logp_grad(logits, log_z[rows], targets[rows])
                    * (grad_out[rows, None].float() * ctx.scale)).to(dtype)
            _add_chunk_grads(grad, rows, flat, w, grad_h, grad_w, grad_b)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def _add_chunk_grads(grad: torch.Tensor, rows: slice, flat: torch.Tensor, w: torch.Tensor,
                     grad_h: torch.Tensor | None, grad_w: torch.Tensor | None, grad_b: torch.Tensor | None) -> None:
    """From a chunk's gradient with respect to its logits (in the matmul's dtype): its rows of the
    head input's gradient, and its share of the weight's and bias's (accumulated in fp32)."""
    if grad_h is not None:
        grad_h[rows] = (grad @ w).to(flat.dtype)
    if grad_w is not None:
        grad_w.addmm_(grad.t().float(), flat[rows].float())
    if grad_b is not None:
        grad_b += grad.float().sum(0)


def _logp_grad(logits: torch.Tensor, log_z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d log p(target) / d logits = onehot(target) - softmax (0 at unlabelled positions)."""
    grad = torch.exp(logits - log_z[:, None]).neg_()
    grad.scatter_add_(-1, targets.clamp(min=0)[:, None], torch.ones_like(log_z)[:, None])
    return grad * (targets != IGNORE_INDEX)[:, None]
