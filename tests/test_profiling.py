"""hdjax.profiling: the union of device intervals, and a trace of real calls read back (on a CPU: wall time only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hdjax import profiling


def test_busy_time_is_the_union_of_the_intervals():
  assert profiling.busy_ns([]) == 0
  assert profiling.busy_ns([(0, 10), (20, 25)]) == 15
  assert profiling.busy_ns([(0, 10), (5, 12), (11, 13), (30, 31)]) == 14  # overlapping streams count once
  assert profiling.busy_ns([(5, 8), (0, 10)]) == 10  # contained


def test_a_traced_call_reports_its_wall_time_and_no_device_plane_on_a_cpu(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((64, 64))
  f(x).block_until_ready()
  p = profiling.profile_calls(lambda: f(x), 3, str(tmp_path))
  assert p.calls == 3 and p.wall_ms > 0
  assert p.trace.startswith(str(tmp_path)) and p.trace.endswith(".xplane.pb")
  assert (p.kernels, p.busy_ms, p.top) == (None, None, ())  # the CPU backend has no /device: plane
  assert "no device plane" in p.text()


XSPACE = """
planes {
  name: "/device:GPU:0"
  lines { name: "Stream #13(Compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000 }
    events { metadata_id: 2 offset_ps: 5000000 duration_ps: 1000000 } }
  lines { name: "XLA Ops" timestamp_ns: 1000 events { metadata_id: 1 offset_ps: 0 duration_ps: 9000000 } }
  event_metadata { key: 1 value { id: 1 name: "gemm_fusion" } }
  event_metadata { key: 2 value { id: 2 name: "loop_fusion" } }
}
planes { name: "/host:CPU" lines { name: "python" events { metadata_id: 1 duration_ps: 7 } }
         event_metadata { key: 1 value { id: 1 name: "host" } } }
"""


def test_device_events_are_the_stream_lines_of_the_device_planes():
  data = profiling.ProfileData.from_text_proto(XSPACE)
  events = profiling.device_events(data)
  assert sorted((name, dur) for name, _, dur in events) == [("gemm_fusion", 4000), ("loop_fusion", 1000)]
  assert profiling.busy_ns([(s, s + d) for _, s, d in events]) == 5000


def test_a_summary_gives_kernels_and_busy_time_per_call_and_the_largest_kernels():
  events = profiling.device_events(profiling.ProfileData.from_text_proto(XSPACE))
  p = profiling.summarise(events, calls=2, wall_ms=0.01, trace="t.xplane.pb", top=1)
  assert (p.kernels, p.busy_ms, p.top) == (1.0, 0.0025, (("gemm_fusion", 0.8),))
  assert p.text().startswith("1 kernels per call, device busy 0.003 of 0.010 ms wall (25%); top: gemm_fusion 80%")
