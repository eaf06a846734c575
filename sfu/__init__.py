"""An untrusted selective forwarding unit (SFU) on aiortc.

The SFU forwards RTP it cannot read: media is SFrame-encrypted end to end, and nothing in this
package imports `mls` or `e2ee_media` (tests/sfu/test_no_keys.py keeps it so). It reads only RTP
and RTCP headers, RFC 8285 header extensions (mid, RFC 6464 audio level, abs-send-time) and the
first byte after the VP8 payload descriptor, which E2EE clients leave in the clear so keyframes
can be found.

Modules:
  tokens        room tokens (HMAC-SHA256), shared with the delivery service that issues them
  errors        SFUError and its subclasses
  config        SFUConfig: token secret and limits
  server        aiohttp app: WebSocket signalling at /v1/signal (protocol in its docstring),
                /metrics (Prometheus text), /healthz
  room          rooms and participants; SFU-driven offer/answer renegotiation; m-lines of
                ended streams reused for the next ones
  forwarding    SourceStream (a published stream) and Slot (one subscriber's copy): SSRC, seq,
                timestamp, payload-type and extension-ID rewriting; NACK cache; upstream NACK,
                PLI throttling, keyframe gate, SR mapping, receiver reports, REMB relay (the
                slowest subscribers' estimate, floored), NACK answers within a budget,
                restarts under a new SSRC
  rtp, rtcp     raw packet parsing and building
  speaker       active-speaker detection from audio levels
  metrics       counters and the forwarding-latency histogram
  ratelimit     the token bucket that limits each socket's signalling messages
  sdnotify      systemd notifications: READY, STOPPING, a watchdog sent from the event loop
  httplog       one short line, not aiohttp's traceback, for a malformed HTTP request (the
                delivery service uses it too)
  aiortc_hooks  every use of aiortc/aioice/pylibsrtp internals (version-checked at import)
  client        a signalling client for aiortc endpoints (tests, app, benchmark)

Run on its own: python -m sfu --host 127.0.0.1 --port PORT --token-secret-file F
"""
