"""Files that cannot be read say why (folder, FIFO, link loop, broken link, permission), the
HC18 pixel-size CSV is checked (non-finite or absurd sizes, conflicting duplicates, binary
content), and the split file of the generic adapter cannot put a case in two splits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dataset_writers import write_hc18, write_lits, write_png
from mtseg_harness.data import HC18, DatasetError, ImageMaskFolder, LiTS, MissingFileError
from mtseg_harness.data.hc18 import read_pixel_size_csv

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def hc_root(tmp_path):
    write_hc18(tmp_path / "hc18", n=3)
    return tmp_path / "hc18"


def _replace(path: Path, kind: str) -> None:
    """Put a folder, a FIFO, a symbolic-link loop or a broken link where ``path`` was."""
    path.unlink()
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "loop":
        os.symlink(path.name, path)  # a link to itself
    elif kind == "broken_link":
        os.symlink("gone.png", path)


WHY = {
    "folder": "is a folder, expected a file",
    "fifo": r"is a FIFO \(named pipe\), not a regular file",
    "loop": "is a symbolic link loop",
    "broken_link": r"is a broken symbolic link \(to 'gone.png'\)",
}


@pytest.mark.parametrize("kind", list(WHY))
def test_an_annotation_that_is_not_a_file_says_what_it_is(hc_root, kind):
    _replace(hc_root / "training_set" / "001_HC_Annotation.png", kind)
    with pytest.raises(DatasetError, match=rf"001_HC_Annotation\.png: annotation {WHY[kind]}$") as info:
        HC18(hc_root, split="all")
    assert not isinstance(info.value, MissingFileError)  # something is there: not "not found"
    HC18.clear_memory_cache()
    ds = HC18(hc_root, split="all", on_error="skip")
    assert len(ds) == 2 and "001_HC_Annotation.png" in ds.skip_report()


@pytest.mark.parametrize("kind", list(WHY))
def test_an_image_replaced_after_indexing_fails_when_read_without_blocking(hc_root, kind):
    image = hc_root / "training_set" / "000_HC.png"
    ds = HC18(hc_root, split="all")
    _replace(image, kind)  # after the index was built (and cached): the read checks again
    result = {}

    def read():
        try:
            ds[0]
        except DatasetError as exc:
            result["error"] = str(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():  # blocked opening the FIFO: give it a writer so the thread ends
        with open(image, "wb"):
            pass
        t.join(5)
        pytest.fail("reading a FIFO in place of an image blocked")
    assert "error" in result
    assert result["error"].endswith(f"000_HC.png: image {WHY[kind].replace(chr(92), '')}")


def test_a_file_without_read_permission_says_so(tmp_path):
    """Run as an unprivileged user (root reads anything): permission denied, not 'corrupt'."""
    folder = Path(tempfile.mkdtemp(prefix="mtseg-perm-", dir="/tmp"))
    try:
        os.chmod(folder, 0o755)
        write_png(folder / "a.png", np.zeros((4, 5), np.uint8))
        (folder / "grade.csv").write_text("name,grade\n")
        for f in folder.iterdir():
            os.chmod(f, 0o000)
        code = textwrap.dedent(f"""
            import os, sys
            sys.path.insert(0, {str(REPO)!r})
            from mtseg_harness.data.io import DatasetError, read_image, read_text
            if os.getuid() == 0:
                os.setgid(65534)
                os.setuid(65534)  # nobody
            for f, reader in (("a.png", read_image), ("grade.csv", read_text)):
                try:
                    reader({str(folder)!r} + "/" + f)
                except DatasetError as exc:
                    print(exc)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines == [f"{folder}/a.png: image cannot be read: permission denied",
                         f"{folder}/grade.csv: text file cannot be read: permission denied"]
    finally:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


# ----------------------------------------------------------------------------- HC18 CSV


def _csv(root: Path, rows: list[str]) -> Path:
    path = root / "training_set_pixel_size_and_HC.csv"
    path.write_text("filename,pixel size(mm),head circumference (mm)\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e300", "0", "-0.1", "1e-300"])
def test_hc18_pixel_size_must_be_a_finite_size_in_mm(hc_root, value):
    _csv(hc_root, ["000_HC.png,0.1,50", f"001_HC.png,{value},51", "002_2HC.png,0.12,52"])
    with pytest.raises(DatasetError, match=r"pixel_size_and_HC\.csv: line 3: pixel size must be a finite size in mm"):
        HC18(hc_root, split="all")


def test_hc18_duplicated_row_with_another_value_is_an_error(hc_root):
    path = _csv(hc_root, ["000_HC.png,0.1,50", "001_HC.png,0.11,51", "002_2HC.png,0.12,52", "000_HC.png,0.2,50"])
    with pytest.raises(DatasetError, match=r"CSV line 5: '000_HC.png' is already on line 2 with other values "
                                           r"\(\(0.1, 50.0\) vs \(0.2, 50.0\)\)"):
        HC18(hc_root, split="all")
    # the same row twice is harmless
    _csv(hc_root, ["000_HC.png,0.1,50", "001_HC.png,0.11,51", "002_2HC.png,0.12,52", "000_HC.png,0.1,50"])
    assert read_pixel_size_csv(path)["000_HC.png"] == (0.1, 50.0)
    HC18.clear_memory_cache()
    assert float(HC18(hc_root, split="all")[0]["spacing"][0]) == pytest.approx(0.1)


def test_hc18_binary_csv_names_the_file(hc_root):
    path = hc_root / "training_set_pixel_size_and_HC.csv"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetError, match=r"training_set_pixel_size_and_HC\.csv: pixel-size CSV is not a text file"):
        HC18(hc_root, split="all")
    path.write_bytes(b"filename,pixel size(mm)\n\xff\xfe.png,0.1\n")  # no NUL byte, but not UTF-8
    with pytest.raises(DatasetError, match=r"pixel-size CSV is not UTF-8 text \(byte 0xff at offset 24\)"):
        HC18(hc_root, split="all")


def test_absurd_nifti_voxel_size_is_an_error(tmp_path):
    write_lits(tmp_path / "lits", n_volumes=1)
    vol = next((tmp_path / "lits").rglob("volume-0.nii"))
    img = nib.Nifti1Image(np.zeros((16, 12, 5), np.int16), np.eye(4))
    img.header.set_zooms((1e7, 0.8, 2.5))  # 10 km voxels: a broken header
    nib.save(img, str(vol))
    with pytest.raises(DatasetError, match=r"volume-0\.nii: voxel size in the header must be a finite size in mm"):
        LiTS(tmp_path / "lits", split="all")[0]


def test_split_file_cannot_put_a_case_in_two_splits(tmp_path):
    for stem in ("a", "b", "c"):
        write_png(tmp_path / "images" / f"{stem}.png", np.zeros((4, 5), np.uint8))
        write_png(tmp_path / "masks" / f"{stem}.png", np.zeros((4, 5), np.uint8))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a", "b"], "val": ["c"]}))
    ds = ImageMaskFolder(tmp_path, split="val", num_classes=2, split_file=split)
    assert [r["case_id"] for r in ds.records] == ["c"]
    split.write_text(json.dumps({"train": ["a", "b"], "val": ["b", "c"]}))
    with pytest.raises(DatasetError, match=r"split.json: case 'b' is listed in both 'train' and 'val'"):
        ImageMaskFolder(tmp_path, split="val", num_classes=2, split_file=split)
