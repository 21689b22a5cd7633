"""GTZAN download and archive extraction against a local HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import ArchiveServer, make_genres_tar, make_zero_bomb

from pipeline.errors import MelsearchError
from pipeline.sources import audio_root, download_with_resume, extract_archive, fetch_gtzan


@pytest.fixture
def served(tmp_path):
    archive = make_genres_tar(tmp_path / "genres.tar.gz").read_bytes()
    server = ArchiveServer({"/genres.tar.gz": archive})
    yield server, archive, hashlib.sha256(archive).hexdigest()
    server.close()


def test_checksum_verified_download_and_extract(served, tmp_path):
    server, archive, sha = served
    dest = fetch_gtzan(tmp_path / "dl" / "genres.tar.gz", urls=[server.url + "/genres.tar.gz"], sha256=[sha], md5=[])
    assert dest.read_bytes() == archive
    root = audio_root(extract_archive(dest, tmp_path / "audio"))
    assert root.name == "genres" and sorted(p.name for p in root.rglob("*.au"))[0] == "blues.00000.au"


def test_wrong_checksum_is_an_error_and_nothing_is_kept(served, tmp_path):
    server, _, _ = served
    dest = tmp_path / "dl" / "genres.tar.gz"
    with pytest.raises(MelsearchError, match="checksum mismatch"):
        fetch_gtzan(dest, urls=[server.url + "/genres.tar.gz"], sha256=["0" * 64], md5=[])
    assert not dest.exists() and not list(dest.parent.glob("*.part"))


def test_interrupted_download_resumes_with_range(served, tmp_path):
    server, archive, sha = served
    dest = tmp_path / "dl" / "genres.tar.gz"
    server.cut_next_at = len(archive) // 3
    with pytest.raises(MelsearchError, match="run again to resume"):
        download_with_resume(server.url + "/genres.tar.gz", dest)
    part = dest.with_name(dest.name + ".part")
    assert part.stat().st_size == len(archive) // 3 and not dest.exists()
    fetch_gtzan(dest, urls=[server.url + "/genres.tar.gz"], sha256=[sha], md5=[])
    assert dest.read_bytes() == archive
    assert server.requests[-1] == ("/genres.tar.gz", f"bytes={len(archive) // 3}-")


def test_failing_mirror_falls_through_to_the_next(served, tmp_path):
    server, archive, sha = served
    urls = [server.url + "/missing.tar.gz", "http://127.0.0.1:9/refused", server.url + "/genres.tar.gz"]
    dest = fetch_gtzan(tmp_path / "dl" / "genres.tar.gz", urls=urls, sha256=[sha], md5=[])
    assert dest.read_bytes() == archive


def test_every_mirror_failing_says_what_to_do(served, tmp_path):
    server, _, sha = served
    with pytest.raises(MelsearchError, match="every GTZAN mirror failed.*--archive.*--audio-dir"):
        fetch_gtzan(tmp_path / "dl" / "genres.tar.gz", urls=[server.url + "/nope"], sha256=[sha], md5=[])


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("genres/blues/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("member,reason", [
    (tarfile.TarInfo("../evil.au"), "'..'"),
    (tarfile.TarInfo("genres/../../evil.au"), "'..'"),
    (tarfile.TarInfo("/tmp/evil.au"), "absolute"),
    (_link("genres/blues/link", "../../../etc/passwd"), "outside"),
    (_link("genres/blues/link", "/etc/passwd"), "outside"),
    (_link("genres/blues/hard", "../../x", tarfile.LNKTYPE), "outside"),
    (_link("genres/dev", "", tarfile.CHRTYPE), "device"),
])
def test_unsafe_archive_members_are_refused(tmp_path, member, reason):
    archive = _tar_with(tmp_path / "bad.tar.gz", member)
    with pytest.raises(MelsearchError, match=reason):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.au").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.tar.gz"]  # no temporary folder left behind


def test_zip_and_plain_tar_and_inside_links(tmp_path):
    zpath = tmp_path / "music.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("Music/rock/a.wav", b"RIFF")
    assert (extract_archive(zpath, tmp_path / "z") / "Music" / "rock" / "a.wav").exists()
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../evil.wav", b"RIFF")
    with pytest.raises(MelsearchError, match="'..'"):
        extract_archive(tmp_path / "evil.zip", tmp_path / "e")
    tar = _tar_with(tmp_path / "links.tar.gz", _link("genres/blues/alias.txt", "ok.txt"))
    assert (extract_archive(tar, tmp_path / "t") / "genres" / "blues" / "alias.txt").read_text() == "ok"
    with pytest.raises(MelsearchError, match="not a readable tar or zip"):
        extract_archive(zpath.with_name("x.tar.gz").write_bytes(b"garbage") and zpath.with_name("x.tar.gz"),
                        tmp_path / "g")


@pytest.mark.parametrize("name", ["bomb.tar.gz", "bomb.zip"])
def test_an_archive_expanding_past_its_budget_is_refused_and_leaves_nothing(tmp_path, name):
    bomb = make_zero_bomb(tmp_path / name, 100_000_000)  # 100 MB of zeros in under 0.5 MB
    with pytest.raises(MelsearchError, match=r"refusing to extract: it expands past .*4x the archive's .*"
                                             r"\[dataset\] extract_max_ratio\)$"):
        extract_archive(bomb, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary folder, nothing extracted
    assert (extract_archive(bomb, tmp_path / "out", max_ratio=1000) / "genres" / "blues" / "blues.00001.wav"
            ).stat().st_size == 100_000_000


def test_extraction_leaves_the_free_disk_it_is_told_to(tmp_path):
    archive = make_genres_tar(tmp_path / "genres.tar.gz")
    with pytest.raises(MelsearchError, match=r"leave less than 1e\+09 GB free .*\[dataset\] extract_min_free_gb"):
        extract_archive(archive, tmp_path / "out", min_free_gb=1e9)
    assert [p.name for p in tmp_path.iterdir()] == ["genres.tar.gz"]


def test_the_bytes_written_are_counted_whatever_the_archive_declares(tmp_path, monkeypatch):
    archive = make_genres_tar(tmp_path / "genres.tar.gz")
    # a member whose data runs on past the size its header declares
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, member: io.BytesIO(bytes(10_000_000)))
    with pytest.raises(MelsearchError, match="refusing to extract: it expands past"):
        extract_archive(archive, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["genres.tar.gz"]
