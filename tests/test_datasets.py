"""Datasets and downloads against a real HTTP server on 127.0.0.1 that misbehaves on purpose."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import tlm  # noqa: F401
from tlm import data
from tlm.data import SOURCES, DataError, Remote, fetch, load_dataset


class Server:
    """Serves ``files`` (path -> bytes) under behaviour prefixes: /ok, /ua, /drop, /slow, /missing."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str]] = []  # (path, user agent, range)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                mode, _, name = self.path.lstrip("/").partition("/")
                agent, rng = self.headers.get("User-Agent", ""), self.headers.get("Range", "")
                server.requests.append((self.path, agent, rng))
                body = server.files.get(name)
                if mode == "missing" or body is None:
                    return self.send_error(404)
                if mode == "ua" and agent.startswith("Python-urllib"):
                    return self.send_error(403)
                if mode == "slow":
                    time.sleep(3)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if mode == "drop" and not rng:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # dropped mid-body
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def remote_for(body: bytes, name: str = "file.bin", *urls: str) -> Remote:
    return Remote(name, hashlib.sha256(body).hexdigest(), tuple(urls), f"x/{name}")


BODY = os.urandom(300_000)


def test_a_server_refusing_python_s_default_user_agent_still_serves_us(server, tmp_path):
    server.files["f"] = BODY
    fetch(remote_for(BODY, "f", f"{server.url}/ua/f"), tmp_path / "f", None, print)
    assert (tmp_path / "f").read_bytes() == BODY
    assert not server.requests[0][1].startswith("Python-urllib")


def test_a_404_moves_on_to_the_next_source(server, tmp_path):
    server.files["f"] = BODY
    fetch(remote_for(BODY, "f", f"{server.url}/missing/f", f"{server.url}/ok/f"), tmp_path / "f", None,
          print)
    assert (tmp_path / "f").read_bytes() == BODY


def test_a_dropped_connection_resumes_with_range(server, tmp_path):
    server.files["f"] = BODY
    fetch(remote_for(BODY, "f", f"{server.url}/drop/f"), tmp_path / "f", None, print)
    assert (tmp_path / "f").read_bytes() == BODY
    assert server.requests[-1][2] == f"bytes={len(BODY) // 2}-"
    assert not (tmp_path / "f.part").exists()


def test_a_wrong_checksum_is_rejected_with_a_clear_error(server, tmp_path):
    server.files["f"] = BODY
    remote = replace(remote_for(BODY, "f", f"{server.url}/ok/f"), sha256="0" * 64)
    with pytest.raises(DataError) as e:
        fetch(remote, tmp_path / "f", str(tmp_path / "mirror"), print)
    message = str(e.value)
    assert "SHA256" in message and f"{server.url}/ok/f" in message and "TLM_DATA_MIRROR" in message
    assert str(tmp_path / "mirror" / "x" / "f") + " (missing)" in message
    assert not (tmp_path / "f").exists()


def test_a_slow_server_and_an_offline_source_fail_in_seconds(server, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "TIMEOUT", 0.5)
    server.files["f"] = BODY
    with socket_closed_port() as port:
        remote = remote_for(BODY, "f", f"{server.url}/slow/f", f"http://127.0.0.1:{port}/f")
        tic = time.monotonic()
        with pytest.raises(DataError) as e:
            fetch(remote, tmp_path / "f", None, print)
    assert time.monotonic() - tic < 15
    assert "timed out" in str(e.value) and "Connection refused" in str(e.value)


class socket_closed_port:
    def __enter__(self):
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc):
        pass


def zipped(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, body in members.items():
            z.writestr(name, body)
    return buf.getvalue()


WIKI = " = Title = \n\n the cat sat on the mat . \n a dog sat on the log . \n"


def test_wikitext_from_a_mirror_url_in_the_release_format(server, tmp_path, monkeypatch):
    archive = zipped({f"wikitext-2/wiki.{s}.tokens": (WIKI * 20 + " unseen words here \n" * (s != "train")).encode()
                      for s in ("train", "valid", "test")})
    server.files["wikitext-2-v1.zip"] = archive
    spec = SOURCES["wikitext2"]
    remote = replace(spec.files[0], sha256=hashlib.sha256(archive).hexdigest(), urls=())
    monkeypatch.setitem(SOURCES, "wikitext2", replace(spec, files=(remote,)))
    # The mirror is a URL base laid out like ../shared/data: <base>/wikitext/<file>.
    server.files["wikitext/wikitext-2-v1.zip"] = archive
    d = load_dataset("wikitext2", tmp_path, mirror=f"{server.url}/ok")
    tok = d.tokenizer
    assert tok.kind == "word" and "<eos>" in tok.vocab and "<unk>" in tok.vocab
    assert [tok.vocab[i] for i in d.train[:5]] == ["=", "Title", "=", "<eos>", "<eos>"]  # a blank line
    assert tok.decode(d.train[:5]) == "= Title =\n\n"  # is one <eos>, which reads as a line break
    assert (np.asarray(d.valid) == tok.index["<unk>"]).sum() == 3  # words unseen in training


def test_enwik8_is_byte_level_with_the_standard_proportions(tmp_path, monkeypatch):
    body = bytes(range(256)) * 40
    mirror = tmp_path / "mirror" / "enwik8"
    mirror.mkdir(parents=True)
    (mirror / "enwik8.zip").write_bytes(zipped({"enwik8": body}))
    spec = SOURCES["enwik8"]
    remote = replace(spec.files[0], sha256=hashlib.sha256((mirror / "enwik8.zip").read_bytes()).hexdigest(),
                     urls=())
    monkeypatch.setitem(SOURCES, "enwik8", replace(spec, files=(remote,)))
    d = load_dataset("enwik8", tmp_path / "data", mirror=str(tmp_path / "mirror"))
    assert d.vocab_size == 256 and d.bits_per_char
    assert (len(d.train), len(d.valid), len(d.test)) == (9216, 512, 512)
    assert bytes(np.asarray(d.train[:3])) == b"\x00\x01\x02"


def test_ptb_and_shakespeare_through_the_offline_mirror(tmp_path, mirror):
    s = load_dataset("shakespeare", tmp_path, mirror)
    assert s.tokenizer.kind == "char" and s.vocab_size == 65 and s.bits_per_char
    assert len(s.train) == 1_003_854 and len(s.valid) == 111_540  # nanoGPT's 90/10 split
    p = load_dataset("ptb", tmp_path, mirror)
    assert p.vocab_size == 10_000 and not p.bits_per_char


def test_two_processes_preparing_one_dataset_share_the_work(tmp_path, mirror):
    code = ("import sys, tlm; from tlm.data import load_dataset; "
            "d = load_dataset('shakespeare', sys.argv[1], sys.argv[2], log=print); print('len', len(d.train))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), mirror], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all("len 1003854" in o for o in outs)
    assert sum("fetching input.txt" in o for o in outs) == 1  # downloaded once
    assert not (tmp_path / "shakespeare" / ".lock").exists()


def test_a_stale_lock_from_a_crashed_holder_is_taken_over(tmp_path, mirror):
    lock = tmp_path / "shakespeare" / ".lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("crashed-host 999999\n")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    said = []
    load_dataset("shakespeare", tmp_path, mirror, log=said.append)
    assert any("taking over a stale lock" in m for m in said)


@pytest.mark.parametrize("kind", ["char", "byte", "word", "bpe"])
def test_your_own_text_with_each_tokenizer(tmp_path, kind):
    text = tmp_path / "notes.txt"
    body = ("It was the best of times, it was the worst of times.\r\n" * 400).encode() + b"caf\xe9\n"
    text.write_bytes(body)
    said = []
    d = load_dataset(str(text), tmp_path / "data", log=said.append, tokenizer=kind)
    assert d.tokenizer.kind == kind and len(d.train) > len(d.valid) > 0 and len(d.test) > 0
    if kind != "byte":
        assert any("1 bytes were not valid UTF-8 and were replaced with U+FFFD" in m for m in said)
        assert "\r" not in d.tokenizer.decode(np.asarray(d.train[:200]).tolist())
    again = load_dataset(str(text), tmp_path / "data", tokenizer=kind)  # from the cache
    np.testing.assert_array_equal(again.train, d.train)


def test_a_directory_of_text_files_and_an_empty_file(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.txt").write_text(f"line {i} of some text\n" * 200)
    d = load_dataset(str(folder), tmp_path / "data")
    assert d.tokenizer.kind == "char" and len(d.train) > 0
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt: no text found"):
        load_dataset(str(empty), tmp_path / "data")


def test_training_on_your_own_text_end_to_end(tmp_path):
    from conftest import tlm_cmd

    text = tmp_path / "story.txt"
    text.write_text("Once upon a time there was a small model that learned to write.\n" * 300)
    run = tmp_path / "run"
    proc = subprocess.run(tlm_cmd("train", "--dataset", str(text), "--tokenizer", "bpe", "--save_dir",
                                  str(run), "--dim", "32", "--num_heads", "2", "--num_blocks", "1",
                                  "--context_size", "16", "--batch_size", "4", "--num_iters", "10"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run(tlm_cmd("sample", "--local", "--save_dir", str(run), "--prompt", "Once upon",
                                 "--max_tokens", "5"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_every_built_in_dataset_has_its_sources_and_only_those():
    """One list of datasets (tlm.config.DATASETS: names, tokenizers, vocabularies); tlm.data
    adds each one's files, and no other."""
    from tlm.config import DATASETS

    assert set(SOURCES) == set(DATASETS)
