"""Container health probe (Docker HEALTHCHECK, Kubernetes exec probes): a worker
is healthy while its ``/healthz`` on ESPER_METRICS_PORT answers 200 (JetStream
answered it recently); a process without a metrics port (a job, a trainer) is
healthy while it runs. Stdlib only: it starts in ~50 ms."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("ESPER_METRICS_PORT", "").strip()
    if not port:
        return 0
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return 0 if resp.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {url} {exc.code} {exc.read().decode(errors='replace')}", file=sys.stderr)
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
