import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
from helpers.bad_images import encode, gradient_image, write_bad_image_folder
from helpers.tiny_runs import write_tar_shard

from pipeline.errors import BadImageError, UsageError
from pipeline.images import load_image
from pipeline.sources import open_source


def png(value: int = 0) -> bytes:
    """A small PNG whose bytes differ per value, so reads can be matched to files."""
    return encode(gradient_image(4 + value, 4), "PNG")


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def reasons(source) -> dict[str, str]:
    return dict(source.skipped)


# Folders


def test_folder_nested_sorted_order(tmp_path):
    files = {"z/f.png": png(1), "a/b/c.png": png(2), "a/d.png": png(3), "e.png": png(4)}
    write_files(tmp_path, files)
    source = open_source(tmp_path)

    assert [record.source for record in source.records] == ["a/b/c.png", "a/d.png", "e.png", "z/f.png"]
    assert [record.index for record in source.records] == [0, 1, 2, 3]
    assert all(record.label is None for record in source.records)
    assert source.kind == "folder"
    for record in source.records:
        assert source.read_bytes(record) == files[record.source]


def test_folder_keys_from_index(tmp_path):
    write_files(tmp_path, {"7.png": png(1), "000000005.png": png(2), "3.png": png(3)})
    source = open_source(tmp_path)

    assert [record.key for record in source.records] == ["000000000", "000000001", "000000002"]
    assert [record.source for record in source.records] == ["000000005.png", "3.png", "7.png"]


def test_folder_follows_symlinked_folder(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_files(root, {"a.png": png(1)})
    write_files(outside, {"b.png": png(2)})
    (root / "linked").symlink_to(outside, target_is_directory=True)
    source = open_source(root)

    assert [record.source for record in source.records] == ["a.png", "linked/b.png"]
    assert source.read_bytes(source.records[1]) == png(2)
    assert source.skipped == []


def test_folder_link_loop_skipped(tmp_path):
    write_files(tmp_path, {"a.png": png(1), "sub/b.png": png(2)})
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    source = open_source(tmp_path)

    assert [record.source for record in source.records] == ["a.png", "sub/b.png"]
    assert reasons(source)["sub/loop"].startswith("symlink loop")


def test_folder_second_link_skipped(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_files(root, {"real/a.png": png(1), "zzz/b.png": png(2)})
    write_files(outside, {"c.png": png(3)})
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    (root / "zzz" / "link_one").symlink_to(outside, target_is_directory=True)
    (root / "zzz" / "link_two").symlink_to(outside, target_is_directory=True)
    source = open_source(root)

    # "alias" sorts first, but real folders are walked before symlinked ones.
    assert [record.source for record in source.records] == ["real/a.png", "zzz/b.png", "zzz/link_one/c.png"]
    assert reasons(source)["alias"] == "folder already indexed as real"
    assert reasons(source)["zzz/link_two"] == "folder already indexed as zzz/link_one"


def test_folder_self_link_file_skipped(tmp_path):
    write_files(tmp_path, {"a.png": png(1)})
    (tmp_path / "self.png").symlink_to(tmp_path / "self.png")
    source = open_source(tmp_path)

    assert len(source) == 1
    assert reasons(source)["self.png"] == "symlink loop"


def test_folder_dangling_link_skipped(tmp_path):
    write_files(tmp_path, {"a.png": png(1)})
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    source = open_source(tmp_path)

    assert len(source) == 1
    assert reasons(source)["gone.png"].startswith("dangling symlink")


def test_folder_os_junk_skipped(tmp_path):
    junk = [".DS_Store", "Thumbs.db", "desktop.ini", "._a.png", "sub/._b.jpg"]
    write_files(tmp_path, {"a.png": png(1), **{name: b"junk" for name in junk}})
    source = open_source(tmp_path)

    assert [record.source for record in source.records] == ["a.png"]
    assert sorted(path for path, _ in source.skipped) == sorted(junk)
    assert {reason for _, reason in source.skipped} == {"os junk file"}


def test_folder_other_files_skipped(tmp_path):
    write_files(tmp_path, {"a.png": png(1), "labels.csv": b"a,1\n", "README": b"x", "empty.jpg": b""})
    source = open_source(tmp_path)

    assert len(source) == 1
    assert reasons(source)["labels.csv"] == "not an image file extension"
    assert reasons(source)["README"] == "not an image file extension"
    assert reasons(source)["empty.jpg"] == "empty file (0 bytes)"


def test_folder_weird_names(tmp_path):
    names = ["with space.png", "ünïcödé.png", "many.dots.in.name.png", "UPPER.JPG", "photo.jfif"]
    write_files(tmp_path, {name: png(index) for index, name in enumerate(names)})
    raw_name = b"raw\xff\xfe.png"
    with open(os.path.join(os.fsencode(tmp_path), raw_name), "wb") as file:
        file.write(png(9))
    source = open_source(tmp_path)
    by_source = {record.source: record for record in source.records}

    assert len(source) == len(names) + 1
    for index, name in enumerate(names):
        assert source.read_bytes(by_source[name]) == png(index)
    undecodable = [record for record in source.records if record.source.startswith("raw")]
    assert len(undecodable) == 1
    assert os.fsencode(undecodable[0].source) == raw_name
    assert source.read_bytes(undecodable[0]) == png(9)


def test_folder_pickle_round_trip(tmp_path):
    write_files(tmp_path, {"a.png": png(1), "b/c.png": png(2)})
    source = pickle.loads(pickle.dumps(open_source(tmp_path)))

    assert [source.read_bytes(record) for record in source.records] == [png(1), png(2)]


def test_fingerprint_stable_and_relocatable(tmp_path):
    write_files(tmp_path / "data", {"a.png": png(1), "b/c.png": png(2)})
    shutil.copytree(tmp_path / "data", tmp_path / "copy")

    first = open_source(tmp_path / "data").fingerprint()

    assert open_source(tmp_path / "data").fingerprint() == first
    assert open_source(tmp_path / "copy").fingerprint() == first
    assert len(first) == 64


def test_fingerprint_changes_with_content(tmp_path):
    write_files(tmp_path, {"a.png": png(1), "b.png": png(2)})
    before = open_source(tmp_path).fingerprint()
    (tmp_path / "b.png").write_bytes(png(5))
    resized = open_source(tmp_path).fingerprint()
    write_files(tmp_path, {"c.png": png(3)})
    added = open_source(tmp_path).fingerprint()

    assert resized != before
    assert added != resized


def test_missing_path_raises(tmp_path):
    missing = tmp_path / "nope"

    with pytest.raises(UsageError, match=re.escape(str(missing))):
        open_source(missing)


def test_empty_folder_raises(tmp_path):
    with pytest.raises(UsageError, match=re.escape(f"no images found under {tmp_path}")):
        open_source(tmp_path)


def test_junk_only_folder_raises(tmp_path):
    write_files(tmp_path, {".DS_Store": b"x", "notes.txt": b"y"})

    with pytest.raises(UsageError, match="2 entries skipped"):
        open_source(tmp_path)


def test_non_tar_file_raises(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png(1))

    with pytest.raises(UsageError, match="not a .tar shard"):
        open_source(path)


def test_bad_image_folder_counts(tmp_path):
    folder = write_bad_image_folder(tmp_path)
    source = open_source(folder.path)

    decoded = 0
    for record in source.records:
        try:
            image = load_image(source.read_bytes(record), record.source)
            image.crop_resize((0, 0, *image.size), 16)
            decoded += 1
        except BadImageError:
            pass

    assert len(source) == folder.indexed
    assert len(source.skipped) == folder.skipped_at_index
    assert decoded == folder.good


# Tar shards


def test_tar_keys_with_dotted_folders(tmp_path):
    shard = write_tar_shard(
        tmp_path / "shard-000.tar",
        [
            ("train.v2/abc.jpg", b"jpeg-1"),
            ("train.v2/abc.cls", b"3\n"),
            ("train.v2/x.y/def.png", b"png-2"),
            ("train.v2/x.y/def.json", b"{}"),
        ],
    )
    source = open_source(shard)

    assert source.kind == "tar"
    assert [record.source for record in source.records] == [
        "shard-000.tar::train.v2/abc.jpg",
        "shard-000.tar::train.v2/x.y/def.png",
    ]
    assert [record.label for record in source.records] == [3, None]
    assert [record.key for record in source.records] == ["000000000", "000000001"]
    assert [source.read_bytes(record) for record in source.records] == [b"jpeg-1", b"png-2"]


def test_tar_sample_without_image_skipped(tmp_path):
    shard = write_tar_shard(
        tmp_path / "s.tar",
        [("a.jpg", b"1"), ("b.cls", b"4"), ("c.seg.png", b"mask"), ("d.JPEG", b"2")],
    )
    source = open_source(shard)

    assert [record.source for record in source.records] == ["s.tar::a.jpg", "s.tar::d.JPEG"]
    assert reasons(source)["s.tar::b"] == "sample has no image field (fields: cls)"
    assert reasons(source)["s.tar::c"] == "sample has no image field (fields: seg.png)"


def test_tar_invalid_label_skipped(tmp_path):
    shard = write_tar_shard(tmp_path / "s.tar", [("a.jpg", b"1"), ("a.cls", b"cat"), ("b.jpg", b"2")])
    source = open_source(shard)

    assert [record.source for record in source.records] == ["s.tar::b.jpg"]
    assert "invalid .cls label 'cat'" in reasons(source)["s.tar::a.jpg"]


def test_tar_folder_of_shards(tmp_path):
    write_tar_shard(tmp_path / "shard-001.tar", [("c.jpg", b"3"), ("c.cls", b"1")])
    write_tar_shard(tmp_path / "shard-000.tar", [("a.jpg", b"1"), ("b.jpg", b"2")])
    write_files(tmp_path, {"README.txt": b"about these shards"})
    source = open_source(tmp_path)

    assert [record.source for record in source.records] == [
        "shard-000.tar::a.jpg",
        "shard-000.tar::b.jpg",
        "shard-001.tar::c.jpg",
    ]
    assert [source.read_bytes(record) for record in source.records] == [b"1", b"2", b"3"]
    assert source.records[2].label == 1


def test_tar_brace_pattern(tmp_path):
    for index in range(3):
        write_tar_shard(tmp_path / "data" / f"shard-{index:03d}.tar", [(f"s{index}.jpg", bytes([index]))])
    source = open_source(f"{tmp_path}/data/shard-{{000..002}}.tar")

    assert [record.source for record in source.records] == [
        "shard-000.tar::s0.jpg",
        "shard-001.tar::s1.jpg",
        "shard-002.tar::s2.jpg",
    ]


def test_tar_brace_pattern_missing_shard(tmp_path):
    write_tar_shard(tmp_path / "shard-000.tar", [("a.jpg", b"1")])

    with pytest.raises(UsageError, match="shard-001.tar"):
        open_source(f"{tmp_path}/shard-{{000..001}}.tar")


def test_tar_truncated_shard_keeps_earlier(tmp_path):
    members = [(f"s{index}.jpg", bytes([index]) * 2000) for index in range(5)]
    data = write_tar_shard(tmp_path / "full.tar", members).read_bytes()
    # Each member takes a 512-byte header and 2048 bytes of data: cut inside member 3's data.
    (tmp_path / "cut.tar").write_bytes(data[: 3 * 2560 + 1000])
    (tmp_path / "full.tar").unlink()
    source = open_source(tmp_path / "cut.tar")

    assert [record.source for record in source.records] == ["cut.tar::s0.jpg", "cut.tar::s1.jpg", "cut.tar::s2.jpg"]
    assert "truncated shard" in reasons(source)["cut.tar"]
    assert reasons(source)["cut.tar::s3.jpg"] == "member data is cut off by the end of the shard"


def test_tar_garbage_header_detected(tmp_path):
    members = [(f"s{index}.jpg", bytes([index]) * 100) for index in range(3)]
    data = bytearray(write_tar_shard(tmp_path / "bad.tar", members).read_bytes())
    data[2 * 1024 : 2 * 1024 + 512] = b"\x7f" * 512  # replace the third header
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    source = open_source(tmp_path / "bad.tar")

    assert len(source) == 2
    assert reasons(source)["bad.tar"].startswith("invalid tar header at byte 2048, so the rest")


def test_tar_empty_shards_skipped(tmp_path):
    write_tar_shard(tmp_path / "a.tar", [("x.jpg", b"1")])
    write_tar_shard(tmp_path / "b.tar", [])
    (tmp_path / "c.tar").write_bytes(b"")
    source = open_source(tmp_path)

    assert len(source) == 1
    assert reasons(source)["b.tar"] == "empty shard: no members"
    assert reasons(source)["c.tar"] == "empty shard (0 bytes)"


def test_tar_all_empty_raises(tmp_path):
    write_tar_shard(tmp_path / "b.tar", [])

    with pytest.raises(UsageError, match="no images found"):
        open_source(tmp_path)


def test_tar_not_a_tar_skipped(tmp_path):
    write_tar_shard(tmp_path / "a.tar", [("x.jpg", b"1")])
    (tmp_path / "b.tar").write_bytes(b"\x1f\x8b" + b"\x00" * 600)
    source = open_source(tmp_path)

    assert len(source) == 1
    assert reasons(source)["b.tar"].startswith("not a readable uncompressed tar file")


def test_tar_and_images_mixed_raises(tmp_path):
    write_tar_shard(tmp_path / "a.tar", [("x.jpg", b"1")])
    write_files(tmp_path, {"stray.png": png(1)})

    with pytest.raises(UsageError, match="both .tar shards and image files"):
        open_source(tmp_path)


def test_tar_shortened_after_indexing(tmp_path):
    shard = write_tar_shard(tmp_path / "s.tar", [("a.jpg", b"1" * 600)])
    source = open_source(shard)
    shard.write_bytes(shard.read_bytes()[:700])

    with pytest.raises(BadImageError, match="truncated"):
        source.read_bytes(source.records[0])


def test_tar_pickle_and_fingerprint(tmp_path):
    shard = write_tar_shard(tmp_path / "s.tar", [("a.jpg", b"12"), ("b.png", b"345")])
    source = open_source(shard)
    restored = pickle.loads(pickle.dumps(source))

    assert restored.fingerprint() == source.fingerprint()
    assert [restored.read_bytes(record) for record in restored.records] == [b"12", b"345"]
