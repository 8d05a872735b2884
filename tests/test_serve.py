"""cxr14-serve in-process (Starlette's TestClient): the upload endpoint answers what `cxr14-predict --json` prints,
the Open Inference Protocol endpoints, the bad-input catalogue, the token, readiness, batching and heatmaps."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import NIH, stage_result
from PIL import Image

from cxr14 import cli
from cxr14.deployment import serve
from cxr14.deployment.predict import heatmap_classes

with warnings.catch_warnings():  # Starlette 1.x asks for httpx2 in its test client; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

NIH_IMAGE = NIH / "images" / "00000003_000.png"


def client(deployed: Path, token: str | None = None, **options) -> TestClient:
    opts = serve.Options(model=str(deployed / "model.onnx"), **options)
    return TestClient(serve.create_app(opts, serve.load(opts), token))


@pytest.fixture(scope="module")
def api(deployed: Path) -> Iterator[TestClient]:
    with client(deployed, max_body_mb=1.0, max_pixels=2_000_000) as c:
        yield c


def predict_json(capsys: pytest.CaptureFixture, *args: str) -> list[dict]:
    capsys.readouterr()
    cli.predict([*args, "--json"])
    return json.loads(capsys.readouterr().out)


def test_upload_answers_what_predict_json_prints(api: TestClient, deployed: Path, capsys) -> None:
    files = [str(NIH_IMAGE), str(deployed / "images/colour.jpg"), str(deployed / "images/nested/img1.png")]
    expected = predict_json(capsys, *files, "--model", str(deployed / "model.onnx"))
    parts = [("file", (f, Path(f).read_bytes(), "application/octet-stream")) for f in files]
    answer = api.post("/predict", files=parts)
    assert answer.status_code == 200 and answer.json() == expected  # one model call, like predict's one batch
    one = api.post(f"/predict?name={files[0]}", content=Path(files[0]).read_bytes(),
                   headers={"Content-Type": "image/png"})
    assert one.json() == predict_json(capsys, files[0], "--model", str(deployed / "model.onnx"))
    assert one.headers["x-request-id"]


def test_open_inference_protocol_health_metadata_and_infer(api: TestClient, deployed: Path, capsys) -> None:
    assert api.get("/v2/health/live").status_code == 200 and api.get("/v2/health/ready").json() == {"ready": True}
    assert api.get("/v2/models/cxr14/versions/1/ready").status_code == 200
    assert api.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = api.get("/v2/models/cxr14").json()
    assert meta["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": [-1, 1, 32, 32]}
    expected = predict_json(capsys, str(NIH_IMAGE), "--model", str(deployed / "model.onnx"))[0]["predictions"]
    from cxr14.data.images import decode_image

    gray = decode_image(NIH_IMAGE, 32)[0]
    for spec in ({"name": "image", "datatype": "UINT8", "shape": [1, 1, 32, 32], "data": gray.ravel().tolist()},
                 {"name": "image_file", "datatype": "BYTES", "shape": [1],
                  "data": [base64.b64encode(NIH_IMAGE.read_bytes()).decode()]}):
        out = {o["name"]: o for o in api.post("/v2/models/cxr14/infer", json={"id": "a", "inputs": [spec]}).json()
               ["outputs"]}
        assert out["probabilities"]["data"] == pytest.approx([r["probability"] for r in expected], abs=1e-7)
        assert out["calibrated"]["data"] == pytest.approx([r["calibrated"] for r in expected], abs=1e-7)
        assert out["decisions"]["data"] == [{"POS": 1, "NEG": 0, "n/a": -1}[r["decision"]] for r in expected]
    assert api.get("/v2/models/other").status_code == 404


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height 8-bit grey pixels, with a few bytes of data: decoded, gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    head = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + head + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def unsupported_dicom() -> bytes:
    from pydicom.encaps import encapsulate
    from test_dicom import dataset

    ds = dataset(np.zeros((8, 8), np.uint8))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.94"  # JPIP Referenced: no decoder exists
    ds.PixelData = encapsulate([bytes(64)])
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_bad_inputs_get_one_line_4xx_and_the_next_request_is_answered(api: TestClient) -> None:
    png = NIH_IMAGE.read_bytes()
    catalogue = {
        "non-image": (422, {"files": {"file": ("notes.png", b"just text, not an image" * 10)}}),
        "truncated PNG": (422, {"files": {"file": ("cut.png", png[:len(png) // 2])}}),
        "decompression bomb": (413, {"files": {"file": ("bomb.png", bomb_png(30_000, 30_000))}}),
        "bomb under Pillow's limit": (413, {"files": {"file": ("big.png", bomb_png(2_000, 1_500))}}),
        "body over the limit": (413, {"content": b"\0" * 1_200_000, "headers": {"Content-Type": "image/png"}}),
        "wrong content type": (415, {"content": png, "headers": {"Content-Type": "text/plain"}}),
        "unsupported DICOM": (422, {"files": {"file": ("x.dcm", unsupported_dicom())}}),
        "no file part": (400, {"files": {"field": (None, b"value")}}),
    }
    for name, (status, request) in catalogue.items():
        answer = api.post("/predict", **request)
        assert answer.status_code == status, (name, answer.text)
        assert list(answer.json()) == ["error"] and "\n" not in answer.text, name
        good = api.post("/predict", files={"file": ("ok.png", png)})
        assert good.status_code == 200 and len(good.json()[0]["predictions"]) == 14, name
    assert "JPIP Referenced" in api.post("/predict", files={"file": ("x.dcm", unsupported_dicom())}).json()["error"]
    for body, status in ((b"{not json", 400), (json.dumps({"inputs": [{"name": "image", "datatype": "UINT8",
                                                                        "shape": [1, 1, 8, 8], "data": [0]}]}), 400)):
        assert api.post("/v2/models/cxr14/infer", content=body).status_code == status
    assert api.post("/v2/models/cxr14/infer", content=b"{}", headers={"Content-Type": "text/csv"}).status_code == 415


def test_with_a_token_a_request_without_it_gets_401_and_nothing_else(deployed: Path) -> None:
    png = NIH_IMAGE.read_bytes()
    with client(deployed, token="s3cret") as c:
        batcher = c.app.service.batcher
        for method, path in (("GET", "/"), ("GET", "/v2/health/live"), ("GET", "/v2/models/cxr14"),
                             ("POST", "/predict"), ("POST", "/v2/models/cxr14/infer")):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                answer = c.request(method, path, files={"file": ("a.png", png)} if method == "POST" else None,
                                   headers=headers)
                assert answer.status_code == 401 and list(answer.json()) == ["error"], path
        assert batcher.calls == []  # nothing was decoded or run
        auth = {"Authorization": "Bearer s3cret"}
        assert c.post("/predict", files={"file": ("a.png", png)}, headers=auth).status_code == 200
        assert c.get("/?token=s3cret").status_code == 200 and c.get("/v2?token=s3cret").status_code == 401
        assert batcher.calls == [1]


def test_a_worker_serves_nothing_until_its_model_is_loaded(deployed: Path) -> None:
    """`--workers N`: each worker loads its model during start-up, which uvicorn finishes before it accepts a
    connection, so no request meets a worker still loading; one that fails to load does not start."""
    loaded, started = threading.Event(), threading.Event()

    def slow(options: serve.Options) -> serve.Model:
        loaded.wait(30)
        return serve.load(options)

    app = serve.create_app(serve.Options(model=str(deployed / "model.onnx")), loader=slow)
    c = TestClient(app)  # its __enter__ runs the lifespan's start-up, as uvicorn does before accepting
    entered = threading.Thread(target=lambda: (c.__enter__(), started.set()))
    entered.start()
    time.sleep(0.5)
    assert not started.is_set()  # still loading: not serving
    loaded.set()
    entered.join(30)
    assert started.is_set()
    try:
        assert c.get("/v2/health/ready").status_code == 200
        assert c.post("/predict", files={"file": ("a.png", NIH_IMAGE.read_bytes())}).status_code == 200
    finally:
        c.__exit__(None, None, None)
    broken = serve.create_app(serve.Options(model=str(deployed / "missing.onnx")))
    with pytest.raises(Exception, match="missing.onnx: not found"), TestClient(broken):
        pass


def test_concurrent_requests_share_model_calls_and_a_lone_one_never_waits() -> None:
    async def scenario() -> tuple[list[int], list[tuple[np.ndarray | None, ...]], float]:
        batcher = serve.Batcher(lambda images: (images.mean(axis=(1, 2))[:, None], None), max_batch=4,
                                max_wait_s=2.0)

        async def one(value: int) -> tuple[np.ndarray | None, ...]:
            return await batcher.submit(np.full((1, 2, 2), value, np.uint8), expected=True)  # decoded

        for _ in range(6):
            batcher.expect()  # six images decoding, as Service.predict_file announces them
        results = await asyncio.gather(*(one(v) for v in range(6)))
        start = time.perf_counter()
        await batcher.submit(np.zeros((1, 2, 2), np.uint8))  # nobody else decoding: no wait for company
        lone = time.perf_counter() - start
        batcher.close()
        return batcher.calls, results, lone

    calls, results, lone = asyncio.run(scenario())
    assert calls == [4, 2, 1] and [float(r[0][0, 0]) for r in results] == list(range(6)) and lone < 0.5
    assert all(r[1] is None for r in results)  # a model without the out-of-distribution score


def test_a_lone_image_runs_on_its_decoding_thread_and_one_model_call_runs_at_a_time() -> None:
    """`run_now_or_put`: a lone decoded image skips the hand-over to the model thread; with another image still
    decoding, both go to the model thread and share a call; an inline call and the model thread's never overlap."""
    running, calls, lock = [0, 0], [], threading.Lock()

    def run(images: np.ndarray) -> tuple[np.ndarray, None]:
        with lock:
            running[0] += 1
            running[1] = max(running)
        time.sleep(0.2)
        with lock:
            running[0] -= 1
            calls.append((threading.current_thread().name, len(images)))
        return images.mean(axis=(1, 2))[:, None], None

    batcher = serve.Batcher(run, max_batch=4, max_wait_s=2.0)
    answers: dict[int, float] = {}

    def job(value: int) -> serve.Job:
        return serve.Job(np.full((1, 2, 2), value, np.uint8), None,
                         lambda out, error: answers.__setitem__(value, float(out[0][0, 0])))

    def decoding_thread(value: int) -> threading.Thread:
        thread = threading.Thread(target=batcher.run_now_or_put, args=(job(value),), name=f"decode-{value}")
        thread.start()
        return thread

    batcher.expect()
    decoding_thread(1).join()  # alone: run on its own thread
    batcher.expect()
    batcher.expect()  # two decoding: the first waits for the second
    first = decoding_thread(2)
    time.sleep(0.1)
    decoding_thread(3).join()
    first.join()
    for _ in range(100):
        if len(calls) == 2:
            break
        time.sleep(0.05)
    batcher.expect()
    inline = decoding_thread(4)  # alone again: runs here for 0.2 s ...
    time.sleep(0.05)
    batcher.put(job(5))  # ... while this one, queued, waits for it to end
    inline.join()
    batcher.close()
    assert calls == [("decode-1", 1), ("cxr14-model", 2), ("decode-4", 1), ("cxr14-model", 1)]
    assert answers == {v: float(v) for v in range(1, 6)} and running[1] == 1 and batcher.incoming == 0


def test_heatmaps_on_request_from_either_engine(deployed: Path, capsys) -> None:
    files = ["--model", str(deployed / "model.pt"), "--thresholds", str(deployed / "thresholds.json"),
             "--calibrator", str(deployed / "calibrator.json")]
    opts = serve.Options(engine="torch", model=files[1], thresholds=files[3], calibrator=files[5])
    model = serve.load(opts)
    image = deployed / "images/nested/img2.png"
    expected = predict_json(capsys, str(image), *files)
    with TestClient(serve.create_app(opts, model)) as c:
        assert c.get("/v2/models/cxr14").json()["parameters"]["heatmaps"] is True
        answer = c.post("/predict?heatmaps=auto", files={"file": (str(image), image.read_bytes())}).json()
        assert c.post("/predict?heatmaps=Nope", files={"file": ("a.png", image.read_bytes())}).status_code == 400
    heat = answer[0].pop("heatmaps")
    assert answer == expected
    from cxr14.data.images import decode_image

    chosen = heatmap_classes(expected[0]["predictions"], np.array([r["calibrated"] for r in expected[0]
                                                                   ["predictions"]]))
    assert list(heat) == [model.classes[k] for k in chosen]
    maps = model.engine.gradcam(decode_image(image, 32)[0][None].copy(), [chosen])[0]
    for k, m in zip(chosen, maps, strict=True):
        png = Image.open(io.BytesIO(base64.b64decode(heat[model.classes[k]])))
        assert png.mode == "RGBA" and png.size == (32, 32)
        assert np.abs(np.asarray(png)[..., 3].astype(int) - np.rint(210 * np.clip(m, 0, 1) ** 0.75)).max() <= 1
    with client(deployed) as c:  # the onnx engine draws them from its file's cam output: the same maps
        assert c.get("/v2/models/cxr14").json()["parameters"]["heatmaps"] is True
        assert c.post("/predict?heatmaps=auto", files={"file": (str(image), image.read_bytes())}).json()[0][
            "heatmaps"] == heat
    opts = serve.Options(model=str(deployed / "model.onnx"))
    old = serve.load(opts)
    old.engine.cam = None  # a file exported before the cam output: refused in one line
    with TestClient(serve.create_app(opts, old)) as c:
        refused = c.post("/predict?heatmaps=all", files={"file": ("a.png", image.read_bytes())})
        assert refused.status_code == 400 and "--engine torch" in refused.json()["error"]


def test_a_foreign_or_stale_model_stops_start_up_in_one_line(deployed: Path, tmp_path: Path, capsys) -> None:
    import onnx

    from cxr14.deployment.onnx_file import METADATA_KEY

    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"not a model at all")
    proto = onnx.load(str(deployed / "model.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    del meta["calibrator"]  # an older layout than this cxr14 reads
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {**props, METADATA_KEY: json.dumps(meta)})
    stale = tmp_path / "stale.onnx"
    onnx.save(proto, str(stale))
    for path, message in ((foreign, "not a readable ONNX model"), (stale, "metadata lacks calibrator")):
        code, err = stage_result(cli.serve, ["--model", path, "--port", "0"], capsys)
        assert code == 1 and len(err) == 1 and message in err[0] and str(path) in err[0]
