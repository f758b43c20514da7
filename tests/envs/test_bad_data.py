"""Hostile and broken data: each bad item is skipped with a reason, counted in
`env.skipped()`, costs bounded memory, and never stops the other items from loading."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import vlmgym_envs
from fixtures.datasets import OSV_ROWS, jpeg, write_osv5m
from PIL import Image
from vlmgym_envs import DataError, ImageLimits, SkipTask, decode_image

BAD_ID = "1000000009"  # an extra OSV-5M row whose image is the bad one


def png_1bit(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG of any size, written row by row: 20000x20000 is ~50 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    compress = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    body = b"".join(compress.compress(row) for _ in range(height)) + compress.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def png(size: tuple[int, int], color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    noise = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    return data[: len(data) * 2 // 3]


def osv_with_bad_member(root, data: bytes, name: str = f"{BAD_ID}.jpg", **kwargs):
    """The OSV-5M fixture plus row BAD_ID, whose image `data` sits in a second shard."""
    rows = [*OSV_ROWS, (BAD_ID, 10.0, 20.0, "FR", "Bretagne", "", "Brest")]
    write_osv5m(root, rows=rows, skip_image=(BAD_ID,))
    with zipfile.ZipFile(root / "images" / "test" / "01.zip", "w") as zf:
        zf.writestr(name, data)
    return vlmgym_envs.make("osv5m", data_dir=root, stage=3, **kwargs)


def assert_skipped(env, idx: int, reason: str) -> SkipTask:
    with pytest.raises(SkipTask) as info:
        env.reset(idx)
    assert info.value.reason == reason
    assert env.skipped() == {reason: 1}
    for good in range(len(env) - 1):  # the other items still load
        assert env.reset(good)[1].images[0].mode == "RGB"
    return info.value


@pytest.mark.parametrize(
    "data,name,reason",
    [
        (png_1bit(20000, 20000), f"{BAD_ID}.png", "image_too_large"),
        (png((4000, 1)), f"{BAD_ID}.png", "bad_aspect_ratio"),
        (truncated_jpeg(), f"{BAD_ID}.jpg", "corrupt_image"),
        (b"this is a text file, not a JPEG\n", f"{BAD_ID}.jpg", "corrupt_image"),
    ],
    ids=["20000x20000", "4000x1", "truncated", "text"],
)
def test_bad_image_is_skipped_and_counted(tmp_path, data, name, reason):
    env = osv_with_bad_member(tmp_path, data, name)
    assert len(env) == 5
    err = assert_skipped(env, 4, reason)
    assert BAD_ID in str(err) and "\n" not in str(err)
    with pytest.raises(SkipTask):
        env.reset(4)
    assert env.skipped() == {reason: 2}  # cumulative


def test_zip_member_over_the_cap(tmp_path):
    cap = 4096
    member = jpeg((1, 2, 3)) + b"\0" * cap  # a JPEG with trailing bytes: slightly over
    env = osv_with_bad_member(tmp_path, member, max_image_bytes=cap)
    err = assert_skipped(env, 4, "archive_member_too_large")
    assert BAD_ID in str(err) and "01.zip" in str(err)


def lying_zip(path, name: str, size: int, claimed: int) -> None:
    """A zip whose headers say the member holds `claimed` bytes; it inflates to `size`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, bytes(size))
    data = bytearray(buffer.getvalue())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, claimed)  # uncompressed size, local header
    struct.pack_into("<I", data, central + 24, claimed)  # and in the central directory
    path.write_bytes(bytes(data))


def test_zip_header_lying_about_the_size(tmp_path):
    env = osv_with_bad_member(tmp_path, b"", max_image_bytes=4096)
    lying_zip(tmp_path / "images" / "test" / "01.zip", f"{BAD_ID}.jpg", 50 * 2**20, 1000)
    # zipfile stops at the claimed size, then the CRC does not match: never 50 MiB in memory
    err = assert_skipped(env, 4, "corrupt_image")
    assert "CRC" in str(err)


def test_csv_bad_rows_are_skipped_not_the_file(tmp_path):
    rows = [*OSV_ROWS[:2], ("1000000005", "abc", 2.0, "FR", "", "", ""), *OSV_ROWS[2:]]
    rows += [
        ("1000000006", "nan", 2.0, "FR", "", "", ""),
        ("1000000007", 95.0, 2.0, "", "", "", ""),
    ]
    write_osv5m(tmp_path, rows=rows)
    with (tmp_path / "test.csv").open("a") as f:
        f.write("1000000008,1.0,2.0\n")  # too few fields
    env = vlmgym_envs.make("osv5m", data_dir=tmp_path)
    assert [env.reset(i)[0].id for i in range(len(env))] == [r[0] for r in OSV_ROWS]
    assert env.skipped() == {"bad_coordinates": 3, "malformed_row": 1}
    geospot = vlmgym_envs.make("geospot", data_dir=tmp_path)
    assert geospot.skipped() == {"bad_coordinates": 3, "malformed_row": 1}


def test_missing_column_and_data_dir_are_one_line_errors(tmp_path):
    write_osv5m(tmp_path, columns=["id", "latitude", "longitude", "country", "region", "city"])
    with pytest.raises(DataError, match=r"test\.csv lacks column\(s\) \['sub-region'\]"):
        vlmgym_envs.make("osv5m", data_dir=tmp_path)
    missing = tmp_path / "no_such_folder"
    for name, kwargs in [
        ("osv5m", {"data_dir": missing}),
        ("geospot", {"data_dir": missing}),
        ("nlvr2", {"data_dir": missing}),
        ("caption", {"data_dir": missing}),
        ("caption", {"annotations": tmp_path / "test.csv", "image_dir": missing}),
    ]:
        with pytest.raises(DataError) as info:
            vlmgym_envs.make(name, **kwargs)
        assert str(missing) in str(info.value) and "does not exist" in str(info.value)
        assert "\n" not in str(info.value)


def test_large_allowed_image_is_downscaled_to_the_budget():
    budget = 100_000
    for data in (jpeg((200, 10, 10), size=(1200, 800)), png((1200, 800), (200, 10, 10))):
        image = decode_image(data, "big", ImageLimits(max_image_pixels=budget))
        assert image.mode == "RGB" and image.width * image.height <= budget
        assert image.width * image.height > 0.95 * budget
        assert image.width / image.height == pytest.approx(1.5, rel=0.01)
        assert image.getpixel((5, 5))[0] > 150
    small = decode_image(jpeg((0, 0, 0)), "small", ImageLimits(max_image_pixels=budget))
    assert small.size == (32, 24)  # never upscaled
    sided = decode_image(png((1200, 800)), "sided", ImageLimits(max_side=300))
    assert sided.size == (300, 200)
    # the default budget sits above Qwen2.5-VL's default max_pixels (12845056)
    assert ImageLimits().max_image_pixels > 12845056


def test_env_applies_the_pixel_budget(tmp_path):
    env = osv_with_bad_member(tmp_path, png((900, 600)), f"{BAD_ID}.png", max_image_pixels=6000)
    image = env.reset(4)[1].images[0]
    assert image.width * image.height <= 6000 and image.width > image.height
    assert env.skipped() == {}


def test_decoded_pixel_limit_is_per_call(tmp_path):
    data = png((3000, 3000))
    with pytest.raises(SkipTask) as info:
        decode_image(data, "x", ImageLimits(max_decoded_pixels=1_000_000))
    assert info.value.reason == "image_too_large" and "max_decoded_pixels" in str(info.value)
    assert decode_image(data, "x", ImageLimits(max_image_pixels=10_000)).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # Pillow's own, untouched


def test_aspect_ratio_kept_under_the_limit_when_downscaling():
    limits = ImageLimits(max_side=1316)
    w, h = limits.target_size(3990, 20)  # flooring 6.6 to 6 would give 219
    assert w <= 1316 and w / h <= 200
    image = decode_image(png((3990, 20)), "thin", limits)
    assert max(image.size) / min(image.size) <= 200


PEAK_RSS = """
import resource, sys
from PIL import Image
from vlmgym_envs import ImageLimits, SkipTask, decode_image
Image.MAX_IMAGE_PIXELS = None  # other code may switch Pillow's own check off: ours still holds
data = open(sys.argv[1], "rb").read()
decode_image(open(sys.argv[2], "rb").read(), "warm-up")  # load the plugins first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    image = decode_image(data, "big", ImageLimits(max_image_pixels=int(sys.argv[3])))
    print("ok", image.size[0] * image.size[1], end=" ")
except SkipTask as err:
    print(err.reason, end=" ")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # MiB (Linux)
"""


def peak_rss(tmp_path, data: bytes, budget: int) -> tuple[str, int]:
    """(outcome, MiB the peak RSS rose by) of decoding `data` in a fresh process."""
    (tmp_path / "big").write_bytes(data)
    (tmp_path / "small.jpg").write_bytes(jpeg((1, 1, 1)))
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, tmp_path / "big", tmp_path / "small.jpg", str(budget)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return " ".join(out[:-1]), int(out[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_memory_is_bounded(tmp_path):
    # 20000x20000 (1.2 GB as RGB): refused from its header
    outcome, grew = peak_rss(tmp_path, png_1bit(20000, 20000), 4096 * 4096)
    assert outcome == "image_too_large" and grew < 300
    # 6000x6000 JPEG: decoded at 1/4 scale in the DCT, never at full size (36 MB as L,
    # 108 MB as RGB)
    big = io.BytesIO()
    Image.new("L", (6000, 6000), 128).save(big, format="JPEG")
    outcome, grew = peak_rss(tmp_path, big.getvalue(), 1_000_000)
    assert outcome.startswith("ok") and int(outcome.split()[1]) <= 1_000_000
    assert grew < 30


# NLVR2 and captions ------------------------------------------------------------------------

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
NLVR2_SCHEMA = pa.schema([
    ("identifier", pa.string()), ("sentence", pa.string()), ("left_image", IMAGE_STRUCT),
    ("right_image", IMAGE_STRUCT), ("label", pa.int64()), ("directory", pa.string()),
])  # fmt: skip


def test_nlvr2_bad_rows_and_images(tmp_path):
    cells = [(jpeg((200, 0, 0)), "A dog.", 0), (truncated_jpeg(), "Two dogs.", 1),
             (jpeg((0, 200, 0)), "A cat.", 7), (jpeg((0, 0, 200)), "  ", 0),
             (png((4000, 1)), "A bird.", None), (jpeg((9, 9, 9)), "A cow.", 1)]  # fmt: skip
    rows = [{"identifier": f"dev-{i}", "sentence": sentence,
             "left_image": {"bytes": left, "path": None},
             "right_image": {"bytes": jpeg((1, 1, 1)), "path": None},
             "label": label, "directory": "1"}
            for i, (left, sentence, label) in enumerate(cells)]  # fmt: skip
    (tmp_path / "data").mkdir()
    table = pa.Table.from_pylist(rows, schema=NLVR2_SCHEMA)
    pq.write_table(table, tmp_path / "data" / "validation-00000-of-00001.parquet")
    env = vlmgym_envs.make("nlvr2", data_dir=tmp_path)
    assert len(env) == 3
    assert env.skipped() == {"bad_label": 2, "no_sentence": 1}
    with pytest.raises(SkipTask, match="row 1 column 'left_image'") as info:
        env.reset(1)
    assert info.value.reason == "corrupt_image"
    assert env.reset(0)[0].label and not env.reset(2)[0].label
    assert env.skipped() == {"bad_label": 2, "no_sentence": 1, "corrupt_image": 1}


def test_nlvr2_from_disk_decodes_within_the_limits(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "identifier": datasets.Value("string"), "sentence": datasets.Value("string"),
        "left_image": datasets.Image(), "right_image": datasets.Image(),
        "label": datasets.ClassLabel(names=["True", "False"]),
        "directory": datasets.Value("string"),
    })  # fmt: skip
    right = {"bytes": jpeg((0, 0, 200)), "path": None}
    rows = {"identifier": ["a", "b"], "sentence": ["A dog.", "A cat."],
            "left_image": [{"bytes": png((900, 600)), "path": None},
                           {"bytes": b"garbage", "path": None}],
            "right_image": [right, right], "label": [0, 1], "directory": ["1", "1"]}  # fmt: skip
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"validation": split}).save_to_disk(str(tmp_path))
    env = vlmgym_envs.make("nlvr2", data_dir=tmp_path, max_image_pixels=6000)
    left = env.reset(0)[1].images[0]
    assert left.width * left.height <= 6000 and left.getpixel((1, 1))[1] > 150
    with pytest.raises(SkipTask, match="row 1 column 'left_image' is corrupt: not JPEG"):
        env.reset(1)
    assert env.skipped() == {"corrupt_image": 1}


def test_caption_bad_entries_and_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.jpg").write_bytes(jpeg((200, 0, 0)))
    (images / "cut.jpg").write_bytes(truncated_jpeg())
    (images / "huge.jpg").write_bytes(jpeg((0, 0, 0)) + bytes(5000))
    coco = {
        "images": [{"id": 1, "file_name": "good.jpg"}, {"id": 2, "file_name": "cut.jpg"},
                   {"id": 3, "file_name": "huge.jpg"}, {"id": 4}, "not an entry"],
        "annotations": [{"image_id": 1, "caption": "red"}, {"image_id": 2, "caption": "cut"},
                        {"image_id": 3, "caption": "big"}, {"image_id": 1, "caption": 5},
                        {"image_id": [1], "caption": "unhashable id"}],
    }  # fmt: skip
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    env = vlmgym_envs.make(
        "caption", annotations=tmp_path / "captions.json", image_dir=images, max_image_bytes=4096
    )
    assert len(env) == 3 and env.skipped() == {"bad_annotation": 2, "bad_image_entry": 2}
    assert env.reset(0)[1].images[0].getpixel((1, 1))[0] > 150
    for idx, reason in ((1, "corrupt_image"), (2, "image_file_too_large")):
        with pytest.raises(SkipTask) as info:
            env.reset(idx)
        assert info.value.reason == reason and str(images) in str(info.value)
    assert env.skipped() == {
        "bad_annotation": 2, "bad_image_entry": 2, "corrupt_image": 1, "image_file_too_large": 1
    }  # fmt: skip


def test_caption_parquet_odd_caption_cells(tmp_path):
    schema = pa.schema([("image", IMAGE_STRUCT), ("captions", pa.list_(pa.string()))])
    cell = {"bytes": jpeg((0, 0, 9)), "path": None}
    rows = [
        {"image": {"bytes": jpeg((0, 255, 0)), "path": None}, "captions": ["green"]},
        {"image": {"bytes": None, "path": "gone.jpg"}, "captions": ["gone"]},
        {"image": cell, "captions": None},
        {"image": cell, "captions": [None, " "]},
    ]
    (tmp_path / "validation").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "validation" / "0.parquet")
    env = vlmgym_envs.make("caption", data_dir=tmp_path)
    assert len(env) == 2 and env.skipped() == {"no_caption": 2}
    with pytest.raises(SkipTask, match="row 1") as info:
        env.reset(1)
    assert info.value.reason == "missing_image"
    assert env.skipped() == {"no_caption": 2, "missing_image": 1}


def test_skip_task_is_a_data_error_with_its_reason():
    err = SkipTask("corrupt_image", "image 'x' (a.zip:x.jpg) is corrupt")
    assert isinstance(err, DataError)
    assert err.reason == "corrupt_image" and "a.zip:x.jpg" in str(err)
    assert vlmgym_envs.make("shapes").skipped() == {}
