"""The resumable position of a training DataLoader: the epoch and the batches consumed, saved in checkpoints."""

from __future__ import annotations

from collections.abc import Callable


class ResumablePosition:
    """Where a training DataLoader is in its epochs, saved in checkpoints and restored on resume.

    ``epoch`` returns the trainer's current epoch (read when an iteration starts); ``consumed`` how
    many batches of it the training loop has finished (None outside a fit: then the batches this
    loader handed out count). Subclasses call :meth:`_next_position` when an iteration starts and
    count the batches they hand out in ``_handed_out``.
    """

    def _track_position(self, epoch: Callable[[], int] | None, consumed: Callable[[], int | None] | None) -> None:
        self._epoch = epoch
        self._consumed = consumed
        self._handed_out = 0
        self._resume_at: tuple[int, int] | None = None

    def _loaded_epoch(self) -> int:
        """The epoch of the current (or last) iteration."""
        raise NotImplementedError

    def _next_position(self, length: int) -> tuple[int, int]:
        """``(epoch, first batch)`` of the iteration that starts now; ``length`` is the batches of an epoch."""
        if self._resume_at is not None:
            epoch, start = self._resume_at
            self._resume_at = None
            if start >= length:
                # Saved after the epoch's last batch: the next iteration is the next epoch's.
                epoch, start = epoch + 1, 0
        else:
            epoch = self._epoch() if self._epoch is not None else self._loaded_epoch()
            start = 0
        self._handed_out = start
        return epoch, start

    def state_dict(self) -> dict[str, int]:
        """The position in the training batches: ``{"epoch": e, "batches_consumed": n}``.

        Under DDP every rank runs the same number of training batches in lockstep, so the
        position that rank 0 saves holds for every rank; each rank still draws its own batches.
        """
        consumed = self._consumed() if self._consumed is not None else None
        return {"epoch": self._loaded_epoch(), "batches_consumed": self._handed_out if consumed is None else consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Start the next iteration after the first ``batches_consumed`` batches of epoch ``epoch``."""
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches_consumed"]))


__all__ = ["ResumablePosition"]
