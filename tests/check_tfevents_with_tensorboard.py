#!/usr/bin/env python3
"""Reads an event folder written by tests/tools/write_sample_tfevents.cpp with TensorBoard's own reader.

Exit 0: TensorBoard sees the expected scalars; 1: it does not; 77: skipped, tensorboard not installed.
"""
import sys

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError as e:
    print(f"SKIPPED: the TensorBoard check needs the tensorboard package ({e})")
    sys.exit(77)

acc = EventAccumulator(sys.argv[1])
acc.Reload()
loss = [(e.step, e.value) for e in acc.Scalars("loss")]
lr = [(e.step, e.value) for e in acc.Scalars("lr")]
ok = [s for s, _ in loss] == [1, 2, 3, 4, 5] and all(abs(v - 1.0 / s) < 1e-6 for s, v in loss) and all(abs(v - 0.001) < 1e-9 for _, v in lr)
print(f"tensorboard read loss={loss} lr steps={[s for s, _ in lr]}: {'OK' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
