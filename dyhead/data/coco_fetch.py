"""COCO 2017: the published archives, the layout the loader reads, and `dyhead fetch-coco`.

Layout under the data root (the coco profile's `data` section names these paths):

    train2017/  val2017/  test2017/          images
    annotations/instances_{train,val}2017.json
    annotations/image_info_test-dev2017.json (test-dev, scored by the COCO server)
    fetch.json                                marker: written last; present = nothing to do

Each archive is downloaded (resumable), verified (size + md5 as published on cocodataset.org)
and only then extracted; a per-archive marker under `.fetch/` lets an interrupted fetch skip what
is already in place. `--from-dir` reuses a copy a cluster already holds (either the extracted
layout, checked by file counts, or the archives themselves, verified like a download).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dyhead.data.fetch import Remote, extract_zip, fetch_file, verify
from dyhead.files import save_json
from dyhead.errors import DyheadError

COCO_BASE = "http://images.cocodataset.org"
MARKER = "fetch.json"


@dataclass(frozen=True)
class Part:
    """One archive and what it puts under the data root."""

    remote: Remote
    files: tuple[str, ...] = ()  # files it provides, relative to the root
    images: tuple[tuple[str, int], ...] = ()  # (directory, number of .jpg files)

    def paths(self) -> list[str]:
        return [d for d, _ in self.images] + list(self.files)


# Sizes and md5s as published for the 2017 archives (cross-checked against several public download
# scripts); the image counts are the official split sizes. image_info_test2017.zip: the md5 is the
# published one, its exact byte count is not confirmed here (about 1.1 MB), so only the md5 decides.
COCO_2017 = {
    "train": Part(Remote("train2017.zip", "zips/train2017.zip", COCO_BASE, size=19_336_861_798,
                         md5="cced6f7f71b7629ddf16f17bbcfab6b2"), images=(("train2017", 118_287),)),
    "val": Part(Remote("val2017.zip", "zips/val2017.zip", COCO_BASE, size=815_585_330,
                       md5="442b8da7639aecaf257c1dceb8ba8c80"), images=(("val2017", 5_000),)),
    "test": Part(Remote("test2017.zip", "zips/test2017.zip", COCO_BASE, size=6_646_970_404,
                        md5="77ad2c53ac5d0aea611d422c0938fb35"), images=(("test2017", 40_670),)),
    "annotations": Part(Remote("annotations_trainval2017.zip", "annotations/annotations_trainval2017.zip",
                               COCO_BASE, size=252_907_541, md5="f4bbac642086de4f52a3fdda2de5fa2c"),
                        files=("annotations/instances_train2017.json", "annotations/instances_val2017.json")),
    "test-info": Part(Remote("image_info_test2017.zip", "annotations/image_info_test2017.zip", COCO_BASE,
                             md5="85da7065e5e600ebfee8af1edb634eb5"),
                      files=("annotations/image_info_test-dev2017.json", "annotations/image_info_test2017.json")),
}


def _count_jpgs(directory: Path) -> int:
    with os.scandir(directory) as it:
        return sum(1 for e in it if e.name.endswith(".jpg"))


def layout_problems(root: Path, part: Part) -> list[str]:
    """What is missing or incomplete for `part` under `root` (empty: in place)."""
    problems = []
    for rel, count in part.images:
        d = Path(root) / rel
        if not d.is_dir():
            problems.append(f"{d}: missing")
        elif (n := _count_jpgs(d)) != count:
            problems.append(f"{d}: {n} images, expected {count}")
    problems += [f"{Path(root) / rel}: missing" for rel in part.files if not (Path(root) / rel).is_file()]
    return problems


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _link_or_copy(src: Path, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if (dst.exists() or dst.is_symlink()) and dst.resolve() == src.resolve():
        return  # already this copy (a link made before, or --from-dir pointing at the root itself)
    if dst.exists() or dst.is_symlink():
        raise DyheadError(f"{dst}: already exists and is not {src}; move it away to reuse {src}")
    if not copy:
        os.symlink(src.resolve(), dst)
        return
    tmp = dst.with_name(f".{dst.name}.copy")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if src.is_dir():
        shutil.copytree(src, tmp)
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _from_local(key: str, part: Part, root: Path, from_dir: Path, copy: bool, log) -> str:
    """Reuse `from_dir`: its extracted layout (link or copy) or its archive (verify + extract)."""
    if not layout_problems(from_dir, part):
        for rel in part.paths():
            _link_or_copy(from_dir / rel, root / rel, copy)
        log(f"{key}: {'copied' if copy else 'linked'} {', '.join(part.paths())} from {from_dir}")
        return str(from_dir)
    archive = from_dir / part.remote.name
    if archive.is_file():
        verify(archive, part.remote, log)
        extract_zip(archive, root, log)
        return str(archive)
    problems = "; ".join(layout_problems(from_dir, part))
    raise DyheadError(f"--from-dir {from_dir}: COCO part {key!r} is neither extracted there ({problems}) "
                      f"nor present as {part.remote.name}")


def fetch_coco(root: Path, parts: list[str] | None = None, *, mirror: str | None = None,
               from_dir: Path | None = None, copy: bool = False, keep_archives: bool = False,
               manifest: dict[str, Part] = COCO_2017, log=print, **download_kw) -> dict:
    """Put the COCO 2017 layout under `root`; return the marker record. A finished fetch is not repeated."""
    root = Path(root)
    keys = list(parts or manifest)
    unknown = [k for k in keys if k not in manifest]
    if unknown:
        raise DyheadError(f"fetch-coco: unknown part(s) {unknown}; expected some of {', '.join(manifest)}")
    marker = root / MARKER
    record = _read_marker(marker)
    if record and all(k in record.get("parts", {}) and not layout_problems(root, manifest[k]) for k in keys):
        log(f"{root}: COCO already fetched ({marker}); nothing to do")
        return record

    if from_dir is not None:
        from_dir = Path(from_dir)
        if not from_dir.is_dir():
            raise DyheadError(f"--from-dir {from_dir}: not a directory")
    root.mkdir(parents=True, exist_ok=True)
    done_dir = root / ".fetch"
    parts_record = dict(record.get("parts", {})) if record else {}
    for key in keys:
        part = manifest[key]
        done = done_dir / f"{key}.json"
        if done.exists() and not layout_problems(root, part):
            parts_record[key] = json.loads(done.read_text())
            log(f"{key}: already in place")
            continue
        if from_dir is not None:
            source = _from_local(key, part, root, from_dir, copy, log)
        else:
            archive = fetch_file(part.remote, root / "archives" / part.remote.name, mirror=mirror, log=log,
                                 **download_kw)
            extract_zip(archive, root, log)
            source = part.remote.url(mirror)
            if not keep_archives:
                archive.unlink()
        problems = layout_problems(root, part)
        if problems:
            raise DyheadError(f"{part.remote.name}: extracted, but {'; '.join(problems)}")
        entry = {"archive": part.remote.name, "md5": part.remote.md5, "size": part.remote.size,
                 "source": source, "paths": part.paths()}
        save_json(done, entry)
        parts_record[key] = entry
    archives = root / "archives"
    if archives.is_dir() and not any(archives.iterdir()):
        archives.rmdir()
    record = {"dataset": "COCO 2017", "root": str(root), "parts": parts_record,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_json(marker, record)
    log(f"{root}: COCO 2017 ready ({', '.join(keys)}) -> {marker}")
    return record
