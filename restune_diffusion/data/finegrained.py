"""Fine-grained classification sets in the layouts they are published in -> captioned samples (issue 17).

Each set is read from its own index files, so the split and the class names are the published ones; captions come
from a template per set ("a photo of a {}, a type of bird"), `--caption_template` overrides it.

| name          | layout read (the folder given, or one level below it)                                         |
| ------------- | --------------------------------------------------------------------------------------------- |
| cub200        | CUB-200-2011: images.txt, image_class_labels.txt, classes.txt, train_test_split.txt, images/  |
| stanford_dogs | Images/<wnid>-<breed>/*.jpg; splits from train_list.mat / test_list.mat (lists.tar)           |
| stanford_cars | devkit/cars_meta.mat + devkit/cars_train_annos.mat + cars_train/ (test: cars_test/ and         |
|               | cars_test_annos_withlabels.mat); or a re-pack with train/<class>/ and test/<class>/ folders    |
| flowers102    | jpg/image_00001.jpg..., imagelabels.mat, setid.mat (trnid / valid / tstid)                     |
| fgvc_aircraft | data/images/<id>.jpg, data/images_variant_{train,val,trainval,test}.txt (100 variants)         |
| food101       | images/<class>/<id>.jpg, meta/{train,test}.txt, meta/classes.txt, meta/labels.txt              |
| class folders | <root>/<class>/* or <root>/{train,test}/<class>/* (`--dataset finegrained` when none above)   |

.mat files are read with scipy.io.loadmat. Stanford Dogs without its lists: every image of Images/ is the train
split. Flowers-102's files hold label numbers only; its 102 names ship here (FLOWERS102_NAMES, in label order) and
`--class_names FILE` (one name per line, in the set's class order) replaces the names of any set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats import DEFAULT_TEMPLATE, WORDNET_PREFIX, Sample, ScanReport, clean_class_name, fix_articles, image_files
from .formats import outside as outside_folder
from .images import IMAGE_EXTENSIONS

# the published label order (imagelabels.mat: 1..102); "barberton daisy" spelled as the flower is
FLOWERS102_NAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barberton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)
SPLIT_FOLDERS = ("train", "val", "test")


@dataclass
class Classes:
    """What a layout reader returns: (image path, class index) pairs, the class names in the set's class order,
    and the files the split and names came from."""

    items: list[tuple[Path, int]]
    names: list[str]
    source: str


# ---------------------------------------------------------------------------------------------------------------------
# reading index files
def _lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of a text index file, blank lines left out; an error names the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found. Expected {what}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}). Expected {what}") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _pairs(path: Path, what: str) -> dict[str, str]:
    """{first field: the rest} of lines like `12 images/0001.jpg` or `1025794 707-320`."""
    table = {}
    for n, line in _lines(path, what):
        key, _, value = line.partition(" ")
        if not value.strip():
            raise ValueError(f"{path}: line {n} is {line!r}; expected {what}")
        if key in table:
            raise ValueError(f"{path}: line {n}: {key!r} appears twice; expected one line per id")
        table[key] = value.strip()
    return table


def _int(value: str, path: Path, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{path}: {field} {value!r} is not an integer") from None


def _loadmat(path: Path, keys: tuple[str, ...], what: str) -> dict:
    from scipy.io import loadmat  # here: scipy.io takes 0.4 s to import, and only these sets need it
    from scipy.io.matlab import MatReadError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found. Expected {what}")
    try:
        mat = loadmat(str(path))
    except (MatReadError, ValueError, OSError, TypeError, NotImplementedError) as err:
        raise ValueError(f"{path}: not a readable MATLAB file ({err}). Expected {what}") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: no {missing[0]!r} entry (found {found}). Expected {what}")
    return mat


def _mat_strings(value) -> list[str]:
    """A MATLAB cell array of strings (as loadmat gives it: nested object arrays) -> flat list of str."""
    return [str(np.asarray(x).ravel()[0]) if np.asarray(x).size else "" for x in np.asarray(value).ravel()]


def _mat_ints(value, path: Path, field: str) -> list[int]:
    flat = [np.asarray(x).ravel() for x in np.asarray(value).ravel()]
    if any(x.size != 1 for x in flat):
        raise ValueError(f"{path}: {field} holds non-scalar entries; expected one integer per image")
    try:
        return [int(x[0]) for x in flat]
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {field} holds non-integer entries; expected one integer per image") from None


def _inside(base: Path, name: str, listed_in: Path, line: str) -> Path:
    if outside_folder(name):
        raise ValueError(f"{listed_in}: {line} names {name!r}, outside {base}; expected a path inside it")
    return base / name


def _check_split(name: str, split: str, splits: tuple[str, ...]) -> None:
    if split not in splits:
        raise ValueError(f"--split {split}: {name} has the splits {', '.join(splits)}")


# ---------------------------------------------------------------------------------------------------------------------
# the published layouts
def read_cub(base: Path, split: str) -> Classes:
    _check_split("CUB-200-2011", split, ("train", "test"))
    images = _pairs(base / "images.txt", "lines `<image id> <class folder>/<file>` (CUB-200-2011 images.txt)")
    labels = _pairs(base / "image_class_labels.txt", "lines `<image id> <class id>`")
    classes = _pairs(base / "classes.txt", "lines `<class id> <nnn.Class_name>`")
    is_train = _pairs(base / "train_test_split.txt", "lines `<image id> <1 train | 0 test>`")
    class_ids = sorted(classes, key=lambda k: _int(k, base / "classes.txt", "class id"))
    index = {k: i for i, k in enumerate(class_ids)}
    want = "1" if split == "train" else "0"
    items = []
    for image_id, name in images.items():
        for table, file in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if image_id not in table:
                raise ValueError(f"{base / file}: no line for image id {image_id} (listed in images.txt)")
        if is_train[image_id] not in ("0", "1"):
            raise ValueError(f"{base / 'train_test_split.txt'}: image id {image_id} has {is_train[image_id]!r}; "
                             "expected 1 (train) or 0 (test)")
        if labels[image_id] not in index:
            raise ValueError(f"{base / 'image_class_labels.txt'}: image id {image_id} has class {labels[image_id]}, "
                             "which classes.txt does not list")
        if is_train[image_id] == want:
            items.append((_inside(base / "images", name, base / "images.txt", f"image id {image_id}"),
                          index[labels[image_id]]))
    names = [clean_class_name(classes[k]) for k in class_ids]
    return Classes(items, names, f"{base}/images.txt, classes.txt, train_test_split.txt")


def read_dogs(base: Path, split: str) -> Classes:
    _check_split("Stanford Dogs", split, ("train", "test"))
    image_dir = base / "Images"
    folders = sorted(d.name for d in image_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    index = {f: i for i, f in enumerate(folders)}
    names = [clean_class_name(f) for f in folders]
    lists = [d / f"{split}_list.mat" for d in (base, base / "lists") if (d / f"{split}_list.mat").is_file()]
    if not lists:
        if split != "train":
            raise FileNotFoundError(f"{base / f'{split}_list.mat'}: file not found; the {split} split of Stanford "
                                    "Dogs is listed there (lists.tar). Without the lists every image is train")
        items = [(p, index[p.relative_to(image_dir).parts[0]]) for p in image_files(image_dir)
                 if len(p.relative_to(image_dir).parts) == 2]
        return Classes(items, names, f"{image_dir} class folders (no train_list.mat: every image)")
    path = lists[0]
    mat = _loadmat(path, ("file_list",), "Stanford Dogs' list: file_list (cell of <wnid-breed>/<file>.jpg)")
    items = []
    for k, name in enumerate(_mat_strings(mat["file_list"])):
        folder = Path(name).parts[0] if Path(name).parts else ""
        if folder not in index:
            raise ValueError(f"{path}: file_list[{k}] is {name!r}, whose class folder is not in {image_dir}")
        items.append((_inside(image_dir, name, path, f"file_list[{k}]"), index[folder]))
    return Classes(items, names, str(path))


def _cars_devkit(base: Path) -> Path | None:
    return next((d for d in (base / "devkit", base) if (d / "cars_meta.mat").is_file()), None)


def read_cars(base: Path, split: str) -> Classes:
    _check_split("Stanford Cars", split, ("train", "test"))
    devkit = _cars_devkit(base)
    if devkit is None:
        return read_split_folders(base, split, "Stanford Cars (devkit/cars_meta.mat, or train/<class>/ and "
                                               "test/<class>/ folders)")
    meta = _loadmat(devkit / "cars_meta.mat", ("class_names",), "cars_meta.mat with class_names (1 x 196 cell)")
    names = [" ".join(n.split()) for n in _mat_strings(meta["class_names"])]
    if split == "train":
        annos_path, image_dir = devkit / "cars_train_annos.mat", base / "cars_train"
    else:
        name = "cars_test_annos_withlabels.mat"
        annos_path = next((d / name for d in (base, devkit) if (d / name).is_file()), base / name)
        image_dir = base / "cars_test"
    what = "annotations with fields fname and class (the devkit's cars_*_annos.mat; the test labels are in " \
           "cars_test_annos_withlabels.mat)"
    annos = np.asarray(_loadmat(annos_path, ("annotations",), what)["annotations"]).ravel()
    fields = annos.dtype.names or ()
    if "fname" not in fields or "class" not in fields:
        raise ValueError(f"{annos_path}: annotations have fields {list(fields)}; expected {what}")
    labels = _mat_ints(annos["class"], annos_path, "annotations.class")
    items = []
    for k, (fname, label) in enumerate(zip(_mat_strings(annos["fname"]), labels)):
        if not 1 <= label <= len(names):
            raise ValueError(f"{annos_path}: annotations[{k}] has class {label}; cars_meta.mat has {len(names)}")
        items.append((_inside(image_dir, fname, annos_path, f"annotations[{k}]"), label - 1))
    return Classes(items, names, f"{annos_path}, {devkit / 'cars_meta.mat'}")


def read_flowers(base: Path, split: str) -> Classes:
    _check_split("Oxford Flowers-102", split, ("train", "val", "test"))
    labels_path, setid_path = base / "imagelabels.mat", base / "setid.mat"
    labels = _mat_ints(_loadmat(labels_path, ("labels",), "labels (1 x 8189, 1..102)")["labels"], labels_path,
                       "labels")
    key = {"train": "trnid", "val": "valid", "test": "tstid"}[split]
    ids = _mat_ints(_loadmat(setid_path, (key,), "trnid, valid and tstid (image numbers)")[key], setid_path, key)
    if max(labels, default=0) > len(FLOWERS102_NAMES) or min(labels, default=1) < 1:
        raise ValueError(f"{labels_path}: labels run from {min(labels)} to {max(labels)}; expected 1..102")
    items = []
    for k, image_number in enumerate(ids):
        if not 1 <= image_number <= len(labels):
            raise ValueError(f"{setid_path}: {key}[{k}] is image {image_number}; imagelabels.mat has {len(labels)}")
        items.append((base / "jpg" / f"image_{image_number:05d}.jpg", labels[image_number - 1] - 1))
    return Classes(items, list(FLOWERS102_NAMES), f"{setid_path} ({key}), {labels_path}")


def _aircraft_data(base: Path) -> Path:
    return base / "data" if (base / "data" / "images_variant_train.txt").is_file() else base


def read_aircraft(base: Path, split: str) -> Classes:
    _check_split("FGVC-Aircraft", split, ("train", "val", "trainval", "test"))
    data = _aircraft_data(base)
    path = data / f"images_variant_{split}.txt"
    rows = _pairs(path, "lines `<image id> <variant>` (FGVC-Aircraft images_variant_<split>.txt)")
    if (data / "variants.txt").is_file():
        names = [line for _, line in _lines(data / "variants.txt", "one variant name per line")]
    else:
        names = sorted(set(rows.values()))
    index = {n: i for i, n in enumerate(names)}
    items = []
    for image_id, variant in rows.items():
        if variant not in index:
            raise ValueError(f"{path}: image {image_id} has variant {variant!r}, which variants.txt does not list")
        items.append((_inside(data / "images", f"{image_id}.jpg", path, f"image {image_id}"), index[variant]))
    return Classes(items, names, str(path))


def read_food(base: Path, split: str) -> Classes:
    _check_split("Food-101", split, ("train", "test"))
    meta = base / "meta"
    classes = [line for _, line in _lines(meta / "classes.txt", "one class folder name per line (apple_pie)")]
    names = [clean_class_name(c) for c in classes]
    if (meta / "labels.txt").is_file():
        labels = [line for _, line in _lines(meta / "labels.txt", "one class name per line (Apple pie)")]
        if len(labels) != len(classes):
            raise ValueError(f"{meta / 'labels.txt'}: {len(labels)} names for the {len(classes)} classes of "
                             "classes.txt; expected one per class, in the same order")
        names = [" ".join(n.lower().split()) for n in labels]
    index = {c: i for i, c in enumerate(classes)}
    path = meta / f"{split}.txt"
    items = []
    for n, line in _lines(path, "lines `<class>/<image id>` (Food-101 meta/<split>.txt)"):
        folder = line.split("/")[0]
        if folder not in index:
            raise ValueError(f"{path}: line {n} is {line!r}, whose class {folder!r} is not in classes.txt")
        items.append((_inside(base / "images", f"{line}.jpg", path, f"line {n}"), index[folder]))
    return Classes(items, names, f"{path}, {meta / 'classes.txt'}")


def _class_folder_items(folder: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = [(p, i) for i, d in enumerate(classes) for p in image_files(d)]
    return items, [d.name for d in classes]


def read_split_folders(base: Path, split: str, what: str = "class folders") -> Classes:
    """<base>/<split>/<class>/*, class names from the folder names (cleaned)."""
    folder = base / split
    if not folder.is_dir():
        have = [s for s in SPLIT_FOLDERS if (base / s).is_dir()]
        raise FileNotFoundError(f"{folder}: folder not found (found splits {have or 'none'}). Expected {what}")
    items, folders = _class_folder_items(folder)
    return Classes(items, [_folder_name(f) for f in folders], f"{folder} class folder names")


def read_class_folders(base: Path, split: str) -> Classes:
    """<base>/<class>/* (every image: split train only), or <base>/{train,test}/<class>/*."""
    if any((base / s).is_dir() for s in ("train", "test")) and _is_split_root(base):
        return read_split_folders(base, split)
    if split != "train":
        raise ValueError(f"--split {split}: {base} has class folders but no {split}/ folder; every image is the "
                         "train split (or lay it out as train/<class>/ and test/<class>/)")
    items, folders = _class_folder_items(base)
    return Classes(items, [_folder_name(f) for f in folders], "class folder names")


def _folder_name(folder: str) -> str:
    name = clean_class_name(folder)
    if not name:
        raise ValueError(f"{folder}: no class name left after removing the numeric prefix; rename the folder")
    return name


def _is_split_root(base: Path) -> bool:
    """train/ (or test/) holds class folders of images, not images itself."""
    for s in ("train", "test"):
        d = base / s
        if d.is_dir() and any(sub.is_dir() and image_files(sub) for sub in d.iterdir() if not sub.name.startswith(".")):
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------------
# detection and captions
@dataclass(frozen=True)
class FineSet:
    category: str
    template: str
    find: Callable[[Path], bool]  # whether a folder holds this layout
    read: Callable[[Path, str], Classes]


def _has(*names: str) -> Callable[[Path], bool]:
    return lambda d: all((d / n).exists() for n in names)


def _dogs_root(d: Path) -> bool:
    images = d / "Images"
    return images.is_dir() and any(WORDNET_PREFIX.match(s.name) for s in images.iterdir() if s.is_dir())


SETS = {
    "cub200": FineSet("bird", "a photo of a {}, a type of bird",
                      _has("images.txt", "classes.txt", "train_test_split.txt", "images"), read_cub),
    "stanford_dogs": FineSet("dog", "a photo of a {}, a type of dog", _dogs_root, read_dogs),
    "stanford_cars": FineSet("car", "a photo of a {}, a type of car", lambda d: _cars_devkit(d) is not None,
                             read_cars),
    "flowers102": FineSet("flower", "a photo of a {}, a type of flower", _has("imagelabels.mat", "setid.mat", "jpg"),
                          read_flowers),
    "fgvc_aircraft": FineSet("aircraft", "a photo of a {}, a type of aircraft",
                             lambda d: (_aircraft_data(d) / "images_variant_train.txt").is_file()
                             and (_aircraft_data(d) / "images").is_dir(), read_aircraft),
    "food101": FineSet("food", "a photo of {}, a type of food", _has("meta/classes.txt", "meta/train.txt", "images"),
                       read_food),
}
NAMES = tuple(SETS)


def find_layout(root: Path, name: str | None = None) -> tuple[str | None, Path]:
    """(set name, the folder holding its files) for the layout in `root` or one level below it; (None, root) when
    none is found (plain class folders). With `name`, only that set is looked for, and its absence is an error."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    candidates = [root] + sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    for base in candidates:
        for set_name, fine in SETS.items():
            if (name is None or set_name == name) and fine.find(base):
                return set_name, base
    if name == "stanford_cars":  # no devkit: read_cars takes train/<class>/ and test/<class>/ folders
        return name, root
    if name is not None:
        raise FileNotFoundError(f"{root}: no {name} layout here or one level below. Expected {_EXPECTED[name]}")
    return None, root


_EXPECTED = {
    "cub200": "images.txt, classes.txt, image_class_labels.txt, train_test_split.txt and images/ (CUB_200_2011)",
    "stanford_dogs": "Images/<wnid>-<breed>/ folders (and train_list.mat / test_list.mat)",
    "flowers102": "jpg/, imagelabels.mat and setid.mat",
    "fgvc_aircraft": "data/images/ and data/images_variant_train.txt (fgvc-aircraft-2013b)",
    "food101": "images/<class>/, meta/classes.txt, meta/train.txt and meta/test.txt (food-101)",
}


def read_class_names(path: str | os.PathLike, count: int, set_name: str) -> list[str]:
    """--class_names FILE: one name per line, in the set's class order; the count must match."""
    names = [line for _, line in _lines(Path(path), "one class name per line")]
    if len(names) != count:
        raise ValueError(f"{path}: {len(names)} class names; {set_name} has {count} classes (one name per line, "
                         "in the set's class order)")
    return names


def caption(template: str, name: str, category: str | None) -> str:
    """The template with `{}` / `{class}` the class name and `{category}` the category; articles fixed."""
    if "{" not in template:
        raise ValueError(f"caption template {template!r} has no placeholder; use {{}} (or {{class}}) for the class "
                         "name, e.g. 'a photo of a {}, a type of bird'")
    if "{category}" in template and not category:
        raise ValueError(f"template {template!r} uses {{category}}: pass category= (e.g. 'bird', 'flower')")
    try:
        return fix_articles(template.format(name, **{"class": name, "category": category}))
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"caption template {template!r}: bad placeholder ({err}); use {{}} or {{class}} for the "
                         "class name and {category} for the category") from err


def finegrained_samples(root: Path, split: str, layout: str, template: str | None, category: str | None,
                        class_names: str | os.PathLike | None, report: ScanReport) -> list[Sample]:
    """Samples of a fine-grained set: `layout` is a name in SETS, or "finegrained" to detect it (plain class folders
    when no published layout is found). Sets report.kind to the layout found."""
    set_name, base = find_layout(root, None if layout == "finegrained" else layout)
    if set_name is None:
        found, label, default_template, default_category = read_class_folders(root, split), "class folders", \
            DEFAULT_TEMPLATE, None
    else:
        fine = SETS[set_name]
        found, label, default_template, default_category = fine.read(base, split), set_name, fine.template, \
            fine.category
    report.kind = set_name or report.kind
    if class_names:
        found.names = read_class_names(class_names, len(found.names), label)
    template = template or default_template
    captions = [caption(template, n, category or default_category) for n in found.names]
    report.source = found.source + (f", names from {class_names}" if class_names else "")
    report.columns = f"split {split}, template {template!r}"
    if not found.items and set_name is None:
        raise ValueError(f"{root}: no images in class sub-folders. Expected <data_dir>/<class_name>/* (or "
                         f"<data_dir>/{split}/<class_name>/*) with extensions {', '.join(IMAGE_EXTENSIONS)}")
    if not found.items:
        raise ValueError(f"{root}: the {split} split of {label} ({found.source}) lists no images")
    return [Sample(path, [captions[i]]) for path, i in found.items]

