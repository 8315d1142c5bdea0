"""Knowledge distillation: a student learns a teacher's next-token distributions.

    teacher.eval()
    loss_fn = distill_loss(teacher, temperature=2.0, alpha=0.5)
    nt.train_utils.train(args, student, loader, loss_fn, ...)

Per batch the teacher runs without recording (`forward_inference`, its own tape) and the
student's loss is alpha * KL + (1 - alpha) * CE: KL = ops.kl_div, T^2 * KL(softmax(teacher /
T) || softmax(student / T)) averaged over positions, and CE the student's own next-token
cross-entropy on the batch's targets. Both models must use the same tokenizer.
"""
from __future__ import annotations

from typing import Any

from . import ops
from .tensor import Tensor


def check_same_vocabulary(teacher, student, teacher_tokenizer=None, student_tokenizer=None) -> None:
    """ValueError unless the two models (and their tokenizers, when given) share one vocabulary."""
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise ValueError(f"the teacher has {tv} tokens and the student {sv}: distillation needs one vocabulary "
                         "(train the student with the teacher's tokenizer)")
    if teacher_tokenizer is None or student_tokenizer is None:
        return
    same = getattr(teacher_tokenizer, "vocab", None) == getattr(student_tokenizer, "vocab", None) and \
        getattr(teacher_tokenizer, "special_tokens", None) == getattr(student_tokenizer, "special_tokens", None)
    if not same:
        raise ValueError("the teacher's tokenizer differs from the data's: the same ids would mean different tokens "
                         "(tokenize the data with the teacher's tokenizer)")


def distill_loss(teacher, temperature: float = 2.0, alpha: float = 0.5):
    """loss_fn(student, (idx, targets)) for nt.train_utils.train: alpha * kl_div(student,
    teacher, temperature) + (1 - alpha) * the student's cross-entropy (positions with
    target -1 count in neither)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    def loss_fn(student, batch: Any) -> Tensor:
        idx, targets = batch
        teacher_logits = teacher.forward_inference(idx)
        student.fuse_classifier = False   # kl_div differentiates the student's logits too
        logits, ce = student.forward(idx, targets)
        t = student.tape
        kl = ops.kl_div(t, logits, teacher_logits, temperature, targets, student.config.vocab_size)
        return ops.add(t, ops.scale(t, kl, alpha), ops.scale(t, ce, 1.0 - alpha))
    return loss_fn
