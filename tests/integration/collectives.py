"""Count the collectives a piece of code issues, from the torch profiler's record of the gloo calls.

    counts = count_collectives(lambda: model(x).sum().backward())   # tests/integration/collectives.py
    counts["all_reduce"].calls, counts["all_reduce"].bytes

Gloo records each collective as "gloo:<name>" with its tensor's shape; DDP's reducer calls it
from C++, which Python-level wrappers would not see. Gloo has no reduce-scatter: FSDP2's
gradient reduce-scatter shows up as an all_reduce of the whole flat gradient.
"""

from collections import defaultdict
from dataclasses import dataclass
from math import prod

from torch.profiler import ProfilerActivity, profile


@dataclass
class Collective:
    calls: int = 0
    bytes: int = 0


def count_collectives(run, element_bytes: int = 4) -> dict[str, Collective]:
    """{collective name: calls and bytes} issued by run() on this rank; element_bytes: the
    tensors' element size (fp32 gradients and parameters: 4)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        run()
    counts = defaultdict(Collective)
    for event in profiler.events():
        if event.name.startswith("gloo:"):
            entry = counts[event.name.removeprefix("gloo:")]
            entry.calls += 1
            entry.bytes += sum(prod(shape) for shape in event.input_shapes if shape) * element_bytes
    return counts
