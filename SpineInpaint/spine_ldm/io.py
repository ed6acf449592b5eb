"""Volume I/O with validation: read_volume / write_volume / validate_volume / check_modality.

Every problem with an input volume raises :class:`spine_ldm.errors.InputError` with a
one-line message that says what is wrong and by how much:

* file missing / unreadable (the reader's first error line is quoted),
* not 3D: 2D images, 3D images with a single slice, 4D images with more than one volume.
  A 4D image holding exactly **one** volume (size 1 along the 4th axis) and a vector image
  with exactly **one** component are squeezed to a 3D scalar volume (geometry kept),
* multi-component voxels (RGB / vector images),
* complex-valued voxels,
* NaN / Inf voxels (the message gives how many of each),
* absurd spacing: any axis below 0.1 mm or above 20 mm (axis and value named),
* a degenerate direction matrix,
* metadata that says the modality is not MR (e.g. DICOM ``Modality = CT``): see
  :func:`check_modality`; missing / unknown modality passes,
* a header that claims more than the voxel limit (:data:`MAX_VOXELS`, env ``SPINE_LDM_MAX_VOXELS``) or data
  shorter than the header claims: :func:`check_volume_file` reads only the header (and counts the bytes of
  compressed data without keeping them), so such files are refused **before** any voxel buffer is allocated.

Outputs: :func:`check_output_path` refuses an output that is an input file (same path, symlink or hard link)
and an output location that cannot be written (a file in the way, a read-only folder), before any work.

Reading supports every format SimpleITK reads (NRRD, NIfTI, MHA, ...) and a folder with
one DICOM series. Writing stores key/value metadata in the header (NRRD / MHA); key
prefixes (``spine_ldm_``) are the caller's job.
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import math
import os
import re
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = [
    "MIN_SPACING_MM",
    "MAX_SPACING_MM",
    "MAX_VOXELS",
    "max_voxels",
    "check_volume_file",
    "check_output_path",
    "read_volume",
    "write_volume",
    "validate_volume",
    "check_modality",
    "image_metadata",
]

MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 20.0
#: Default voxel limit of an input volume (128 Mi voxels: 512 x 512 x 512, or 1024 x 1024 x 128; a lumbar T2 has
#: 5-60 M). Override with env ``SPINE_LDM_MAX_VOXELS``. Checked on the header, before the voxels are read.
MAX_VOXELS = 128 * 2 ** 20
MAX_VOXELS_ENV = "SPINE_LDM_MAX_VOXELS"
_AXES = ("i", "j", "k", "t")

#: Metadata keys that may carry the imaging modality (case-insensitive match).
MODALITY_KEYS = ("0008|0060", "modality", "dicom_modality", "spine_ldm_modality")
#: DICOM modality codes that are certainly not MR (values outside this set and "MR" pass).
NON_MR_MODALITIES = {
    "CT": "CT", "PT": "PET", "PET": "PET", "NM": "nuclear medicine", "US": "ultrasound", "CR": "radiograph",
    "DX": "radiograph", "DR": "radiograph", "RG": "radiograph", "MG": "mammography", "XA": "X-ray angiography",
    "RF": "fluoroscopy", "IO": "intra-oral X-ray", "PX": "panoramic X-ray", "OCT": "optical coherence tomography",
    "XC": "photograph", "ES": "endoscopy", "SEG": "segmentation", "RTDOSE": "RT dose", "RTSTRUCT": "RT structure",
}


def _short(msg: str) -> str:
    """One informative line from a (multi-line) SimpleITK / ITK error message.

    Takes the text after ``ERROR:`` (without the ``NrrdImageIO(0x...):`` object prefix) and, for
    libraries that print a trace of ``[lib] ...`` lines (teem/NRRD), appends the innermost cause.
    """
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    head = next((ln for ln in lines if "ERROR:" in ln), None)
    if head is None:
        head = next((ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK")), lines[0] if lines else "")
    else:
        head = head.split("ERROR:", 1)[1].strip()
    head = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", head)
    if "Unable to determine ImageIO reader" in head:
        return "not a recognised image format (expected NRRD, NIfTI, MHA, a DICOM folder, ...)"
    trace = [ln for ln in lines if ln.startswith("[")]
    if trace:
        cause = trace[-1].split("]", 1)[-1].strip()
        head = f"{head.rstrip(':')}: {cause}"
    return (head or "unknown error")[:300]


def image_metadata(image: sitk.Image) -> dict[str, str]:
    """All header key/value pairs of ``image`` as a plain dict."""
    return {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}


def check_modality(metadata: Mapping | None, source: str = "volume") -> None:
    """Reject metadata whose modality is obviously not MR (e.g. ``Modality = CT``).

    Looks at the keys in :data:`MODALITY_KEYS` (case-insensitive). ``MR`` / ``MRI`` and any
    unknown value pass; so does metadata without a modality key.
    """
    if not metadata:
        return
    for key, value in metadata.items():
        if str(key).strip().lower() not in MODALITY_KEYS:
            continue
        val = str(value).strip().strip("\\").upper()
        if val in NON_MR_MODALITIES:
            raise InputError(
                f"{source} is {NON_MR_MODALITIES[val]} (metadata {key} = {str(value).strip()}), "
                "but SpineInpaint needs a T2-weighted MR volume")


def _squeeze(image: sitk.Image, source: str) -> sitk.Image:
    dim = image.GetDimension()
    size = image.GetSize()
    shape = "x".join(str(s) for s in size)
    if dim == 4:
        if size[3] != 1:
            raise InputError(f"{source} is 4D ({shape}) with {size[3]} volumes; a single 3D volume is required")
        image = sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0],
                             sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    elif dim != 3:
        raise InputError(f"{source} is {dim}D ({shape}); a 3D volume is required")
    ncomp = image.GetNumberOfComponentsPerPixel()
    ptype = image.GetPixelIDTypeAsString().lower()
    if "complex" in ptype:
        raise InputError(f"{source} has complex-valued voxels ({image.GetPixelIDTypeAsString()}); a real-valued magnitude image is required")
    if ncomp > 1:
        kind = "RGB/RGBA colour" if ncomp in (3, 4) else "vector"
        raise InputError(f"{source} has {ncomp} components per voxel ({kind}); a scalar grayscale volume is required")
    if "vector" in ptype:  # a vector image with exactly one component
        image = sitk.VectorIndexSelectionCast(image, 0)
    return image


def validate_volume(image: sitk.Image, source: str = "volume") -> sitk.Image:
    """Validate an image and return it as a 3D scalar ``sitk.Image``.

    A 4D image with one volume and a 1-component vector image are squeezed (a new image
    with the same geometry is returned); otherwise the input object itself is returned.
    Raises :class:`InputError` as described in the module docstring.
    """
    if not isinstance(image, sitk.Image):
        raise InputError(f"{source} must be a SimpleITK.Image, got {type(image).__name__}")
    image = _squeeze(image, source)
    size = image.GetSize()
    if min(size) < 2:
        flat = [_AXES[a] for a, s in enumerate(size) if s < 2]
        raise InputError(
            f"{source} is effectively 2D ({'x'.join(map(str, size))}, a single voxel along axis {', '.join(flat)}); "
            "a 3D volume is required")
    for a, s in enumerate(image.GetSpacing()):
        if not math.isfinite(s) or s < MIN_SPACING_MM or s > MAX_SPACING_MM:
            raise InputError(
                f"{source} spacing along axis {_AXES[a]} is {s:g} mm, outside the plausible range "
                f"{MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm (wrong header units?)")
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    det = float(np.linalg.det(d))
    if not np.all(np.isfinite(d)) or abs(abs(det) - 1.0) > 1e-3:
        raise InputError(f"{source} has a degenerate direction matrix (determinant {det:.3g}, expected +-1)")
    if not np.all(np.isfinite(image.GetOrigin())):
        raise InputError(f"{source} has a non-finite origin {image.GetOrigin()}")
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        n_nan = int(np.count_nonzero(np.isnan(arr)))
        n_inf = int(np.count_nonzero(np.isinf(arr)))
        if n_nan or n_inf:
            raise InputError(
                f"{source} contains {n_nan} NaN and {n_inf} Inf voxels (of {arr.size}); "
                "replace them before inpainting")
    return image


# ---------------------------------------------------------------------------------------------- header checks
def max_voxels() -> int:
    """The input voxel limit: env ``SPINE_LDM_MAX_VOXELS`` (a positive integer, ``2e8`` is accepted) or
    :data:`MAX_VOXELS`."""
    text = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not text:
        return MAX_VOXELS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 1):
        raise InputError(f"{MAX_VOXELS_ENV} must be a positive number of voxels, got {text!r}")
    return int(value)


@contextlib.contextmanager
def _itk_warnings_off():
    """ITK prints warnings (e.g. GDCM's "No Series were found") straight to stderr; our own one-line errors say
    what is wrong, so they are silenced while we probe."""
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def _bytes_per_voxel(pixel_id: int, components: int) -> int:
    try:
        probe = sitk.Image([1, 1, 1], pixel_id, max(1, int(components))) if components > 1 else \
            sitk.Image([1, 1, 1], pixel_id)
        itemsize = sitk.GetArrayViewFromImage(probe).dtype.itemsize
    except (RuntimeError, TypeError, ValueError):  # pragma: no cover - exotic pixel types
        itemsize = 1
    return itemsize * max(1, int(components))


_CHUNK = 1 << 20


def _inflated_at_least(stream, need: int) -> int:
    """Bytes a decompressing file object yields, read in chunks and counted only (nothing kept), stopping once
    ``need`` bytes were seen. A truncated or corrupt stream counts what came out before the error."""
    total = 0
    try:
        while total < need:
            chunk = stream.read1(min(_CHUNK, need - total))
            if not chunk:
                break
            total += len(chunk)
    except (EOFError, OSError, zlib.error, ValueError):
        pass
    return total


def _zlib_at_least(fh, need: int) -> int:
    """Like :func:`_inflated_at_least` for a raw zlib/gzip stream (MetaImage ``CompressedData``)."""
    d = zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib or gzip header
    total, data = 0, b""
    try:
        while total < need and not d.eof:
            data = d.unconsumed_tail or fh.read(_CHUNK)
            if not data:
                break
            total += len(d.decompress(data, _CHUNK * 4))
    except zlib.error:
        pass
    return total


def _text_header(path: Path, end_marker) -> tuple[str, int]:
    """(header text, offset of the first data byte) of a text-header format; ``end_marker(lines)`` says where the
    header ends (the index of its last line, or None while it has not ended)."""
    with path.open("rb") as fh:
        raw = fh.read(1 << 20)
    lines = raw.split(b"\n")
    offset = 0
    for n, line in enumerate(lines[:-1]):
        offset += len(line) + 1
        if end_marker(n, line.rstrip(b"\r")):
            return b"\n".join(lines[: n + 1]).decode("latin-1"), offset
    return raw.decode("latin-1"), len(raw)


def _nrrd_data(path: Path) -> tuple[list[Path], int, str, int, int]:
    """(data files, data offset in the first, encoding, byte skip, line skip) of a NRRD / NHDR header."""
    text, offset = _text_header(path, lambda n, line: n > 0 and line == b"")
    fields = {}
    for line in text.splitlines()[1:]:
        if line.startswith("#") or ":" not in line or ":=" in line:
            continue
        k, v = line.split(":", 1)
        fields[k.strip().lower().replace(" ", "")] = v.strip()
    enc = fields.get("encoding", "raw").lower()
    files = [path]
    if fields.get("datafile"):
        ref = fields["datafile"]
        if ref.upper().startswith("LIST") or "%" in ref or " " in ref:
            files = []  # a list / pattern of data files: ITK checks each one itself
        else:
            files, offset = [(path.parent / ref)], 0
    try:
        byte_skip, line_skip = int(fields.get("byteskip", "0")), int(fields.get("lineskip", "0"))
    except ValueError:
        byte_skip, line_skip = 0, 0
    return files, offset, enc, byte_skip, line_skip


def _meta_data(path: Path) -> tuple[list[Path], int, bool]:
    """(data files, data offset in the first, compressed) of a MetaImage (.mha / .mhd) header."""
    text, offset = _text_header(path, lambda n, line: line.lower().replace(b" ", b"").startswith(b"elementdatafile="))
    fields = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            fields[k.strip().lower()] = v.strip()
    compressed = fields.get("compresseddata", "false").lower() == "true"
    ref = fields.get("elementdatafile", "LOCAL")
    if ref.upper() == "LOCAL":
        return [path], offset, compressed
    if ref.upper().startswith("LIST") or "%" in ref or " " in ref:
        return [], 0, compressed
    return [path.parent / ref], 0, compressed


def _nifti_offset(head: bytes) -> int | None:
    """vox_offset of a NIfTI-1/-2 header (None when ``head`` is not one)."""
    import struct

    for endian in ("<", ">"):
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            return int(struct.unpack(endian + "f", head[108:112])[0])
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            return int(struct.unpack(endian + "q", head[168:176])[0])
    return None


def _data_available(path: Path, need: int, values: int) -> tuple[int, int, str] | None:
    """(bytes available, bytes needed, description) of the voxel data of ``path``, or None when the format is
    not one whose data we can count (ITK then checks it itself, after allocating)."""
    with path.open("rb") as fh:
        head = fh.read(544)
    if head.startswith(b"NRRD"):
        files, offset, enc, byte_skip, line_skip = _nrrd_data(path)
        if len(files) != 1 or line_skip or byte_skip < 0 or not files[0].is_file():
            return None
        data = files[0]
        if enc in ("raw",):
            return data.stat().st_size - offset - byte_skip, need, "raw data"
        if enc in ("gzip", "gz", "bzip2", "bz2"):
            opener = gzip.GzipFile if enc.startswith("gz") else bz2.BZ2File
            with data.open("rb") as fh:
                fh.seek(offset)
                with opener(fileobj=fh) as stream:
                    return _inflated_at_least(stream, need + byte_skip) - byte_skip, need, f"{enc}-compressed data"
        if enc in ("ascii", "text", "txt"):  # at least one character per value
            return data.stat().st_size - offset, values, "text data (one character per value at least)"
        if enc == "hex":
            return data.stat().st_size - offset, 2 * need, "hex data"
        return None
    suffix = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() in (".mha", ".mhd"):
        files, offset, compressed = _meta_data(path)
        if len(files) != 1 or not files[0].is_file():
            return None
        if compressed:
            with files[0].open("rb") as fh:
                fh.seek(offset)
                return _zlib_at_least(fh, need), need, "compressed data"
        return files[0].stat().st_size - offset, need, "raw data"
    if head[:2] == b"\x1f\x8b" and suffix.endswith(".nii.gz"):
        with gzip.open(path, "rb") as stream:
            first = stream.read(544)
            off = _nifti_offset(first)
            if off is None:
                return None
            return len(first) + _inflated_at_least(stream, off + need - len(first)) - off, need, "gzip-compressed data"
    off = _nifti_offset(head)
    if off is not None and path.suffix.lower() == ".nii":
        return path.stat().st_size - off, need, "data"
    return None


def check_volume_file(path, limit: int | None = None, dicom_files: list[str] | None = None) -> dict:
    """Refuse a volume file before its voxels are read: more voxels than ``limit`` (default :func:`max_voxels`),
    or voxel data shorter than its header claims (raw data by file size; gzip / bzip2 / zlib data by counting the
    decompressed bytes in chunks, keeping none). Reads only the header. DICOM folders: the first file's header
    times the number of files of the series (``dicom_files`` when the caller already listed them).
    Returns ``{"size", "voxels", "bytes"}``; raises :class:`InputError` (also when ITK cannot read the header).
    Formats whose data cannot be counted (e.g. a list of NRRD data files) get the voxel limit only.
    """
    p = Path(os.fspath(path)).expanduser()
    limit = max_voxels() if limit is None else int(limit)
    r = sitk.ImageFileReader()
    if p.is_dir():
        files = dicom_files or _dicom_files(p)
        r.SetFileName(files[0])
    else:
        r.SetFileName(str(p))
    try:
        with _itk_warnings_off():
            r.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read '{p}': {_short(str(exc))}") from None
    size = list(r.GetSize())
    if p.is_dir() and len(files) > 1:
        size = size[:2] + [(size[2] if len(size) > 2 else 1) * len(files)]
    voxels = math.prod(int(s) for s in size)
    shape = "x".join(str(s) for s in size)
    if voxels > limit:
        raise InputError(f"'{p.name}' claims {shape} = {voxels:,} voxels, over the limit of {limit:,} "
                         f"(set {MAX_VOXELS_ENV} to raise it)")
    nbytes = voxels * _bytes_per_voxel(r.GetPixelID(), r.GetNumberOfComponents())
    if not p.is_dir():
        got = _data_available(p, nbytes, voxels * max(1, r.GetNumberOfComponents()))
        if got is not None and got[0] < got[1]:
            have, need, what = got
            raise InputError(f"'{p.name}' is truncated: its header claims {shape} voxels ({need:,} bytes of "
                             f"{what}) but the file holds only {max(0, have):,}")
    return {"size": tuple(size), "voxels": voxels, "bytes": nbytes}


def _dicom_files(path: Path) -> list[str]:
    with _itk_warnings_off():
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not ids:
            raise InputError(f"no volume file or DICOM series found in folder '{path}'")
        if len(ids) > 1:
            raise InputError(f"folder '{path}' holds {len(ids)} DICOM series; pass the folder or a file of one "
                             "series")
        return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0]))


def _read_dicom_dir(files: list[str]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    # copy the first slice's tags (modality etc.) onto the volume
    for key in reader.GetMetaDataKeys(0):
        try:
            image.SetMetaData(key, reader.GetMetaData(0, key))
        except (RuntimeError, UnicodeDecodeError):  # pragma: no cover - odd binary tags
            pass
    return image


def read_volume(path, modality_check: bool = True) -> sitk.Image:
    """Read and validate a 3D scalar volume (any SimpleITK format, or a DICOM series folder).

    Header metadata is kept on the returned image. Raises :class:`InputError` with a
    one-line message for every problem (see module docstring).
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise InputError(f"file not found: '{p}'")
    try:
        if p.is_dir():
            files = _dicom_files(p)
            check_volume_file(p, dicom_files=files)
            image = _read_dicom_dir(files)
        else:
            check_volume_file(p)
            image = sitk.ReadImage(str(p))
    except InputError:
        raise
    except (RuntimeError, OSError) as exc:
        raise InputError(f"cannot read '{p}': {_short(str(exc))}") from None
    meta = image_metadata(image)
    try:
        image = validate_volume(image, source=f"'{p.name}'")
    except InputError as exc:
        if "2D" in str(exc) and p.is_file() and (p.suffix.lower() in (".dcm", ".ima") or "0008|0060" in meta):
            raise InputError(f"{exc} (a single DICOM file is one slice: pass the folder of the series)") from None
        raise
    if modality_check:
        check_modality(meta, source=f"'{p.name}'")
    if not image.GetMetaDataKeys() and meta:  # squeezed: carry the header over
        for k, v in meta.items():
            image.SetMetaData(k, v)
    return image


# ---------------------------------------------------------------------------------------------- output checks
def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _input_files(inputs) -> list[Path]:
    """Every file an input consists of: the file itself (a symlink resolved), a NRRD/MetaImage header's
    detached data file, every file of a DICOM folder."""
    out: list[Path] = []
    for item in inputs:
        p = Path(os.fspath(item)).expanduser()
        if p.is_dir():
            with contextlib.suppress(OSError):
                out += [Path(e.path) for e in os.scandir(p) if e.is_file()]
            continue
        out.append(p)
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
            if p.suffix.lower() == ".nhdr":
                out += _nrrd_data(p)[0]
            elif p.suffix.lower() == ".mhd":
                out += _meta_data(p)[0]
    return out


def check_output_path(path, inputs=()) -> Path:
    """Refuse, before any work, an output ``path`` that would replace an input file (the same path, a symlink
    to it or a hard link of it; a detached data file or a file of a DICOM input folder counts as an input) or
    that cannot be written: a file where a folder is needed, a folder where the file should go, a folder without
    write permission or on a read-only file system (probed by creating and removing a hidden temporary file in
    the deepest folder that exists). Returns the path; raises :class:`InputError` naming it."""
    p = Path(os.fspath(path)).expanduser()
    for src in _input_files(inputs):
        if p.absolute() == src.absolute() or _same_file(p, src):
            raise InputError(f"output '{p}' is the input file '{src}' (same file): choose another output name, "
                             "the input is never overwritten")
    if p.is_dir():
        raise InputError(f"cannot write '{p}': it is a folder; give a file name inside it")
    folder = p.absolute().parent
    while not folder.exists() and folder != folder.parent:
        if folder.is_symlink():  # a dangling link where a folder should be
            break
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"cannot write '{p}': '{folder}' is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".spine-ldm-write-test-", dir=folder)
    except OSError as exc:
        raise InputError(f"cannot write '{p}': folder '{folder}' is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return p


def _meta_str(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)) or value is None:
        return json.dumps(value)
    if isinstance(value, np.generic):
        return json.dumps(value.item())
    if isinstance(value, np.ndarray):
        return json.dumps(value.tolist())
    return json.dumps(value, default=str)


def write_volume(image: sitk.Image, path, metadata: Mapping | None = None, compress: bool = True) -> Path:
    """Write ``image`` (format from the suffix; NRRD recommended) with extra header metadata.

    Values that are not strings are JSON-encoded (dicts, lists, numbers). Keys are written
    as given (the caller adds the ``spine_ldm_`` prefix). Existing metadata of ``image`` is
    kept; the caller's image object is not modified. Parent folders are created.
    Returns the written path.
    """
    if not isinstance(image, sitk.Image):
        raise InputError(f"expected a SimpleITK.Image to write, got {type(image).__name__}")
    p = Path(os.fspath(path)).expanduser()
    out = sitk.Image(image)  # shallow copy-on-write: metadata changes do not touch the caller's image
    for key, value in (metadata or {}).items():
        k = str(key)
        if not k or any(c in k for c in ":=\n\r"):
            raise InputError(f"invalid metadata key {key!r} (no ':', '=', or newlines allowed)")
        v = _meta_str(value)
        if "\n" in v or "\r" in v:
            v = v.replace("\r", " ").replace("\n", " ")
        out.SetMetaData(k, v)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(out, str(p), compress)
    except (RuntimeError, OSError) as exc:
        raise InputError(f"cannot write '{p}': {_short(str(exc))}") from None
    return p
