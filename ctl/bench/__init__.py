"""The load generator behind `echoctl bench` and `echoctl compare`: one module per job.

- config: what a run is (BenchConfig) and its bounds.
- options: the click options that build a BenchConfig.
- target: resolving the target, or reading it from a daemon's status.
- schedule: the paced send schedule.
- worker: one worker process; messages: what it sends its parent.
- pingpong: plain ping-pong; stream: byte-checked streams, pipelines and random sizes.
- udp, udpflow, udplost, udpwire, udpio, mmsg, udpreport: `--udp`, datagrams to a UDP echo
  server: the loop, one flow's checks and losses, the datagram, the batched system calls,
  and the report.
- runner: the parent side of a run; report: merging and rendering the figures.
- histogram, sizes, progress: latency histograms, message sizes, progress lines.

Import from the modules themselves; this package module imports nothing.
"""
