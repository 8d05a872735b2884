"""Benchmark: `cxr14-serve` on loopback against `cxr14-predict` on the same images, in one run on this machine.

  - predict: the NIH sample folder (308 PNGs) to a CSV in a fresh process, and one image, in fresh processes;
    throughput past start-up is (N - 1) images over the difference (as benchmarks/bench_deploy.py); the one-image
    predict time past start-up is measured in this process (decode, forward, calibrate, table: `predict_images` on
    one file), median and p99 over the 308 images;
  - serve: one server process (`python -m cxr14.deployment.serve`, the same model), clients POSTing the images'
    bytes to /predict on persistent connections, 1, 4 and 16 at a time, `--requests` each level (cycling over
    the 308 images): throughput, p50 and p99 latency; the clients (raw sockets, `post`) run on the same cores as
    the server; at one client also each request's latency over predict's time on the same image;
  - paired (the latency target): `--requests` rounds of predict's one-image time in this process, then one POST of
    the same image, so that both sample the machine at the same moments (on a shared host its speed drifts by
    20-40% over tens of seconds, measured: a sweep of predict before the server and the server after compare two
    different machines);
  - alternated (the throughput target): `--rounds` rounds of predict's CSV throughput (fresh processes, as above)
    and then the server's at 16 clients, a ratio per round, their median;
  - memory: the server's resident memory after a warm-up, then across `--memory-requests` (10,000) more at 16
    clients, sampled every 1,000.
Targets (issue 29): 16 clients >= 0.8x predict's CSV throughput (alternated); p99 at one client <= 1.5x the
one-image predict time (its median, paired); memory growth <= 50 MB over 10,000 requests.

    python benchmarks/bench_serve.py [--nih ../shared/nih] [--model models/model.onnx] [--requests 616]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CI": "1"}


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    return time.perf_counter() - start


def predict_figures(files: list[Path], model: list[str]) -> dict:
    """Predict's CSV throughput past start-up (fresh processes, median of 3) and its one-image time in-process."""
    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, "-m", "stages.predict", *model, "--csv", f"{tmp}/out.csv"]
        one = statistics.median(timed([*base, str(files[0])]) for _ in range(3))
        folder = statistics.median(timed([*base, str(files[0].parent)]) for _ in range(3))
    one_image, file = one_image_predict(model)
    times = [one_image(f) for f in files]
    return {"model": str(file), "csv_images_per_s": (len(files) - 1) / (folder - one),
            "one_image_run_s": one, "folder_run_s": folder, "one_image_ms_median": 1000 * statistics.median(times),
            "one_image_ms_p99": 1000 * float(np.percentile(times, 99)), "one_image_ms": [1000 * t for t in times]}


def one_image_predict(model: list[str]) -> tuple[Callable[[Path], float], Path]:
    """Predict's time for one image in this process past start-up (decode, forward, calibration, table), and the
    model file it chose."""
    from cxr14.deployment import predict

    engine = predict.open_engine("onnx", Path(model[1]) if model else None, "auto", predict.settings(None))
    thresholds, calibrator = predict.calibration(engine, None, None)

    def seconds(file: Path) -> float:
        start = time.perf_counter()
        list(predict.predict_images(engine, [str(file)], calibrator, thresholds, 1, 1))
        return time.perf_counter() - start

    return seconds, engine.file


def paired(port: int, files: list[Path], bodies: list[bytes], model: list[str], rounds: int) -> dict:
    """Rounds of predict on image i in this process, then the server on the same image (one client): both see
    the machine at the same moments. The target's ratio: the server's p99 over predict's median."""
    one_image, _ = one_image_predict(model)
    ours, theirs = [], []
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock, sock.makefile("rb") as reader:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(rounds):
            theirs.append(one_image(files[i % len(files)]))
            start = time.perf_counter()
            assert post(sock, reader, bodies[i % len(bodies)]) == 200
            ours.append(time.perf_counter() - start)
    serve_ms, predict_ms = 1000 * np.array(ours), 1000 * np.array(theirs)
    return {"rounds": rounds, "serve_p50_ms": float(np.median(serve_ms)),
            "serve_p99_ms": float(np.percentile(serve_ms, 99)), "predict_median_ms": float(np.median(predict_ms)),
            "predict_p99_ms": float(np.percentile(predict_ms, 99)),
            "p99_vs_predict_median": float(np.percentile(serve_ms, 99) / np.median(predict_ms)),
            "same_image_p50": float(np.median(serve_ms / predict_ms)),
            "same_image_p99": float(np.percentile(serve_ms / predict_ms, 99))}


def alternated_throughput(port: int, files: list[Path], bodies: list[bytes], model: list[str], requests: int,
                          rounds: int) -> dict:
    """Rounds of predict's CSV throughput past start-up (fresh processes: the folder, less one image) and then the
    server's at 16 clients, each round's ratio from two measurements moments apart: the sweep compares a predict
    measured before the server with a server measured a minute later, and the host's speed drifts meanwhile."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, "-m", "stages.predict", *model, "--csv", f"{tmp}/out.csv"]
        for _ in range(rounds):
            csv = (len(files) - 1) / (timed([*base, str(files[0].parent)]) - timed([*base, str(files[0])]))
            serve = load(port, bodies, 16, requests)["images_per_s"]
            rows.append({"predict_csv_images_per_s": csv, "serve_16_images_per_s": serve, "ratio": serve / csv})
    return {"rounds": rows, "median_ratio": float(np.median([r["ratio"] for r in rows]))}


def start_server(model: list[str], port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "cxr14.deployment.serve", *model, "--port", str(port), *extra],
                            cwd=ROOT, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server did not start: {log.read_text()[-2000:]}")


def post(sock: socket.socket, reader: Any, body: bytes) -> int:
    """One POST /predict on a persistent HTTP/1.1 connection, the response read whole: its status.

    A raw-socket client rather than http.client: the clients share the server's 2 cores, and http.client's Python
    per request (~0.3 ms CPU, 0.6 ms at the one-client median, measured) would be counted against the server."""
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n"
                 % len(body) + body)
    status, length = int(reader.readline().split()[1]), 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    reader.read(length)
    return status


def load(port: int, bodies: list[bytes], clients: int, requests: int) -> dict:
    """`requests` POSTs by `clients` threads on persistent connections: throughput and latency percentiles, and
    each request's latency by image (request i sends image i mod len(bodies))."""
    latencies: list[tuple[int, float]] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    failures = []

    def client() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock, sock.makefile("rb") as reader:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                status = post(sock, reader, bodies[i % len(bodies)])
                latencies.append((i % len(bodies), time.perf_counter() - start))
                if status != 200:
                    failures.append(status)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    assert not failures, failures[:5]
    seconds = [s for _, s in latencies]
    return {"clients": clients, "requests": requests, "images_per_s": requests / wall,
            "p50_ms": 1000 * float(np.percentile(seconds, 50)), "p99_ms": 1000 * float(np.percentile(seconds, 99)),
            "by_image": latencies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih", type=Path, default=ROOT.parent / "shared" / "nih")
    parser.add_argument("--model", type=Path, help="the .onnx file (default: predict's choice among models/)")
    parser.add_argument("--requests", type=int, default=616, help="requests per concurrency level (default 616)")
    parser.add_argument("--memory-requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternated rounds of predict's CSV throughput and the server's at 16 clients")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--serve-args", default="", help="more cxr14-serve options, e.g. '--threads 4'")
    args = parser.parse_args()
    files = sorted((args.nih / "images").glob("*.png"))
    model = ["--model", str(args.model)] if args.model else []
    figures = {"cpus": os.cpu_count(), "images": len(files), "predict": predict_figures(files, model)}
    print(json.dumps({k: v for k, v in figures["predict"].items() if k != "one_image_ms"}, indent=1), flush=True)
    bodies = [f.read_bytes() for f in files]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkdtemp()) / "serve.log"
    proc = start_server(model, port, log, args.serve_args.split())
    try:
        server = psutil.Process(proc.pid)
        load(port, bodies, 4, len(bodies))  # warm-up: every image once
        figures["serve"] = [load(port, bodies, c, args.requests) for c in (1, 4, 16)]
        for row in figures["serve"]:
            print(json.dumps({k: v for k, v in row.items() if k != "by_image"}), flush=True)
        figures["paired"] = paired(port, files, bodies, model, args.requests)
        print(json.dumps({"paired": figures["paired"]}), flush=True)
        figures["alternated"] = alternated_throughput(port, files, bodies, model, args.requests, args.rounds)
        print(json.dumps({"alternated": figures["alternated"]}), flush=True)
        rss = [server.memory_info().rss / 2**20]
        done = 0
        while done < args.memory_requests:
            n = min(1000, args.memory_requests - done)
            load(port, bodies, 16, n)
            done += n
            rss.append(server.memory_info().rss / 2**20)
        figures["memory_mb"] = {"after_warm_up": rss[0], "samples": rss, "growth": rss[-1] - rss[0],
                                "requests": done}
    finally:
        proc.terminate()
        proc.wait(60)
    p, s = figures["predict"], {r["clients"]: r for r in figures["serve"]}
    same_image = [1000 * t / p["one_image_ms"][i] for i, t in s[1].pop("by_image")]  # per request, same image
    for row in figures["serve"]:
        row.pop("by_image", None)
    figures["ratios"] = {"throughput_16_vs_predict_csv": s[16]["images_per_s"] / p["csv_images_per_s"],
                         "alternated_throughput_16_vs_predict_csv": figures["alternated"]["median_ratio"],
                         "paired_p99_1_client_vs_predict_median": figures["paired"]["p99_vs_predict_median"],
                         "paired_same_image_p99": figures["paired"]["same_image_p99"],
                         "p99_1_client_vs_one_image_median": s[1]["p99_ms"] / p["one_image_ms_median"],
                         "p99_1_client_vs_one_image_p99": s[1]["p99_ms"] / p["one_image_ms_p99"],
                         "same_image_p50": float(np.percentile(same_image, 50)),
                         "same_image_p99": float(np.percentile(same_image, 99))}
    print(json.dumps({"memory_mb": figures["memory_mb"], "ratios": figures["ratios"]}, indent=1))
    q = figures["paired"]
    print(f"paired, one client: serve p99 {q['serve_p99_ms']:.1f} ms = {q['p99_vs_predict_median']:.2f}x predict's "
          f"one-image median {q['predict_median_ms']:.1f} ms (target <= 1.5); same image {q['same_image_p50']:.2f}x "
          f"at p50, {q['same_image_p99']:.2f}x at p99")
    alternated = ", ".join(f"{r['ratio']:.2f}x" for r in figures["alternated"]["rounds"])
    print(f"16 clients: {figures['alternated']['median_ratio']:.2f}x predict's CSV throughput, median of "
          f"{len(figures['alternated']['rounds'])} alternated rounds ({alternated}; target >= 0.8), "
          f"{figures['ratios']['throughput_16_vs_predict_csv']:.2f}x in the sweep; unpaired, p99 at 1 client "
          f"{s[1]['p99_ms']:.1f} ms = "
          f"{figures['ratios']['p99_1_client_vs_one_image_median']:.2f}x predict's one-image median (target <= 1.5), "
          f"{figures['ratios']['p99_1_client_vs_one_image_p99']:.2f}x its p99; per request against predict on the "
          f"same image {figures['ratios']['same_image_p50']:.2f}x at p50, {figures['ratios']['same_image_p99']:.2f}x "
          "at p99; "
          f"memory growth {figures['memory_mb']['growth']:+.1f} MB over {done} requests (target <= 50)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
