"""One real `cxr14-serve` process (uvicorn) shared by the tests that need a socket: tritonclient's HTTP client,
the page in headless Chromium (Playwright), and the SIGTERM drain, which stops it and so runs last."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import NIH, launch

from cxr14 import cli

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serve_process")]
NIH_IMAGE = NIH / "images" / "00000003_000.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_files(deployed: Path) -> list[str]:
    return ["--model", str(deployed / "model.onnx")]


@pytest.fixture(scope="module")
def server(deployed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`python -m cxr14.deployment.serve` on the tiny model's ONNX file, which draws heatmaps from its cam output
    (the torch engine takes 10 s to start on a busy 2-core machine against 1.4 s: it is tested in-process)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as err:
        proc = launch([sys.executable, "-m", "cxr14.deployment.serve", *model_files(deployed),
                       "--port", str(port), "--max-wait-ms", "20", "--threads", "1"],  # 1: see the SIGTERM test
                      stdout=err, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    assert proc.poll() is None, log.read_text()
    yield {"proc": proc, "port": port, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def predicted(deployed: Path, image: Path, capsys: pytest.CaptureFixture) -> list[dict]:
    capsys.readouterr()
    cli.predict([str(image), *model_files(deployed), "--json"])
    return json.loads(capsys.readouterr().out)


def test_tritonclient_sees_a_live_ready_server_and_predicts_probabilities(server: dict, deployed: Path,
                                                                          capsys) -> None:
    tritonclient = pytest.importorskip("tritonclient.http")
    c = tritonclient.InferenceServerClient(f"127.0.0.1:{server['port']}")
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("cxr14")
    meta = c.get_model_metadata("cxr14")
    assert [i["name"] for i in meta["inputs"]] == ["image_file", "image"][::-1] and meta["versions"] == ["1"]
    expected = np.array([r["probability"] for r in predicted(deployed, NIH_IMAGE, capsys)[0]["predictions"]])
    image = tritonclient.InferInput("image_file", [1], "BYTES")
    image.set_data_from_numpy(np.array([NIH_IMAGE.read_bytes()], dtype=np.object_))
    answer = c.infer("cxr14", [image], outputs=[tritonclient.InferRequestedOutput("probabilities")])
    assert answer.as_numpy("probabilities").shape == (1, 14)
    np.testing.assert_allclose(answer.as_numpy("probabilities")[0], expected, atol=1e-5, rtol=0)


@pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (.ci/run installs Debian's chromium)")
def test_the_page_shows_the_apis_numbers_and_is_usable_from_the_keyboard(server: dict, deployed: Path,
                                                                         capsys) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    expected = {r["class"]: r for r in predicted(deployed, NIH_IMAGE, capsys)[0]["predictions"]}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server['port']}/")
        page.wait_for_selector("#model:has-text('heatmaps on')")
        page.set_input_files("#files", [str(NIH_IMAGE)])
        page.wait_for_selector("tbody tr", timeout=30_000)
        shown = page.eval_on_selector_all("tbody tr", """rows => rows.map(r => ({finding: r.dataset.finding,
            decision: r.cells[4].textContent, cells: Array.from(r.querySelectorAll('td[data-key]')).map(
            c => [c.dataset.key, c.dataset.value, c.textContent])}))""")
        assert sorted(s["finding"] for s in shown) == sorted(expected)
        for row in shown:
            want = expected[row["finding"]]
            assert row["decision"] == want["decision"]
            for key, value, text in row["cells"]:
                if want[key] is None:
                    assert value == "" and text == "–"
                else:
                    sign = "+" if key == "margin" and want[key] >= 0 else ""
                    assert float(value) == want[key] and text == f"{sign}{want[key]:.4f}"
        order = [(s["decision"], expected[s["finding"]]["margin"]) for s in shown]
        rank = {"POS": 0, "NEG": 1, "n/a": 2}
        assert [rank[d] for d, _ in order] == sorted(rank[d] for d, _ in order)
        page.focus("tbody tr:nth-child(3)")
        page.keyboard.press("ArrowDown")
        page.keyboard.press("Enter")
        chosen = page.eval_on_selector("tbody tr[aria-selected='true']", "r => r.dataset.finding")
        assert chosen == shown[3]["finding"]
        assert page.get_attribute(".heat", "alt") == f"Grad-CAM heatmap of {chosen}"  # the onnx engine's heatmap
        assert page.text_content(".caption").startswith(f"Heatmap: {chosen.replace('_', ' ')}, calibrated ")
        page.set_input_files("#files", [str(Path(__file__))])  # not an image: refused, shown, the page goes on
        page.wait_for_selector(".error[role=alert]")
        assert "cannot decode image" in page.text_content(".error")
        browser.close()


def test_workers_answer_from_their_first_connection_and_stop_on_sigterm(deployed: Path, tmp_path: Path,
                                                                        capsys) -> None:
    """`--workers 2`: two worker processes on one port, each accepting only once its model is loaded (no 503 on
    a fresh connection right after the first ready answer), the results predict's; SIGTERM stops them all."""
    port, log = free_port(), tmp_path / "workers.log"
    with open(log, "w") as err:
        proc = launch([sys.executable, "-m", "cxr14.deployment.serve", *model_files(deployed), "--port", str(port),
                       "--workers", "2"], stdout=err, stderr=subprocess.STDOUT)
    try:
        deadline, ready = time.monotonic() + 120, False
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/v2/health/ready")
                ready = conn.getresponse().status == 200
            except OSError:
                time.sleep(0.05)
        assert ready, log.read_text()
        answers, workers = [], set()
        for i in range(24):  # a fresh connection each: the kernel hands them to either worker
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", f"/predict?name={i}.png", body=NIH_IMAGE.read_bytes(),
                         headers={"Content-Type": "image/png"})
            response = conn.getresponse()
            answers.append((response.status, json.loads(response.read())))
            workers.add(response.getheader("x-request-id").split("-")[0])
            conn.close()
        assert all(status == 200 for status, _ in answers), answers
        expected = predicted(deployed, NIH_IMAGE, capsys)[0]["predictions"]
        assert all(doc[0]["predictions"] == expected for _, doc in answers)
        children = {f"{c.pid:x}" for c in psutil.Process(proc.pid).children()}
        assert workers and workers <= children  # answered by the workers, not the parent
        assert log.read_text().count("Application startup complete") == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert log.read_text().count("Finished server process") == 2 and "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_answers_every_accepted_request_then_exits(server: dict) -> None:
    """A burst, SIGTERM while it is served: every request the server had accepted gets its answer.

    Accepted: uvicorn closes, unanswered, a connection whose request it has not begun to read when the signal
    comes (its graceful shutdown). So the burst is sent, then the signal waits 0.25 s: time for the event loop to
    begin all 16 requests, not to answer them (64 images for one decoding thread, `--threads 1`: ~0.7 s here)."""
    png = NIH_IMAGE.read_bytes()
    answers, sent = {}, threading.Barrier(17)

    def one(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
        body = b"".join(b"--b\r\nContent-Disposition: form-data; name=file; filename=burst%d_%d.png\r\n\r\n%s\r\n"
                        % (i, k, png) for k in range(4)) + b"--b--\r\n"
        try:
            conn.request("POST", "/predict", body=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
        finally:
            sent.wait()
        response = conn.getresponse()
        answers[i] = (response.status, json.loads(response.read()))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    sent.wait()
    time.sleep(0.25)
    server["proc"].send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert server["proc"].wait(60) == 0
    assert sorted(answers) == list(range(16))
    assert all(status == 200 and [r["image"] for r in doc] == [f"burst{i}_{k}.png" for k in range(4)]
               for i, (status, doc) in answers.items())
    log = server["log"].read_text()
    assert log.count("POST /predict 200") >= 16
    assert log.index("Shutting down") < log.rindex("POST /predict 200")  # answered after the signal, not before
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server["port"]), timeout=1)
    assert "Traceback" not in log
