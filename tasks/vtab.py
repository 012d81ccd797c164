"""VTAB-1k: 19 tasks in 3 groups (docs/protocols.md §10), read from NOAH's exported layout or from TFDS's files.

    <data-root>/vtab-1k/<folder>/{train800,val200,train800val200,test}.txt   "<image path> <label>"
    <data-root>/vtab-1k/<folder>/images/<split>/NNNNNN.jpg
    <data-root>/<tfds builder>[/<config>]/<version>/<builder>-<split>.tfrecord-*   (TFDS's data_dir: VPT's, E^2VPT's)

The TFDS form (``sources["tfds"]``, read by :mod:`peftbench.data.layouts.tfds`) is the data of the official
VPT/E^2VPT pipeline: each split is google-research/task_adaptation@d7630d3's slice of the TFDS split
(``task_adaptation/data/<dataset>.py``: ``tfds_splits`` and the ``*_SPLIT_PERCENT`` constants, written here with
``n`` = the TFDS split's size), each label its label function, each builder version the pattern it pins (KITTI:
3.2.0 as VPT's vendored copy pins it, KMnP/vpt@4410440 src/data/vtab_datasets/kitti.py:175). When a data root
holds both forms, NOAH's is read (``peftbench.data.layouts.locate``); the record's ``data_pipeline`` says which.

Canonical names follow the E^2VPT/VPT commands; folder names are NOAH's; aliases cover the names
other repositories use: NOAH's folders (``cifar``, ``kitti``, ``dsprites_loc`` ...), NOAH's/V-PETL's
scripts (``cifar100``, ``oxford_pet``), task_adaptation's dataset names and VPT's ``DATA.NAME`` values
with their parameters (``vtab-cifar(num_classes=100)``,
``vtab-dsprites(predicted_attribute="label_x_position",num_classes=16)`` ...; spacing, quoting and
parameter order do not matter, see :func:`peftbench.tasks.normalise_task_name`).

Split sizes: train800 800, val200 200, train800val200 1000 (the VTAB-1k protocol), and the test size
under google-research/task_adaptation's split definitions, taken from the ``expected_num_samples`` of
its per-dataset tests (``task_adaptation/data/*_test.py``; KITTI from the version that pins TFDS
kitti 3.2.0, where test = 711). ``peftbench data verify`` checks every split against them.

Classes: every class must occur in ``test`` (``complete_splits``), except for KITTI, whose 4 distance
bins are not guaranteed to all occur among its 711 test images (a missing one is only noted).
train800/val200 are the first examples of the task's (unstratified) train/val portions, so a class
missing there is only noted (SUN397 has 397 classes for 800 images).
"""
from peftbench.tasks import Suite, Task, register_suite, register_task

HOW_TO_GET = ("VTAB-1k is not downloadable here: get NOAH's exported VTAB-1k archive (or run "
              "`peftbench data prepare --suite vtab`) and pass --data-root DIR so that DIR/vtab-1k/<task>/ exists, "
              "or pass TFDS's data_dir (the folder holding <builder>/<version>/, as VPT's DATA.DATAPATH) as --data-root.")


def _carved(percent: int, base: str = "train") -> str:
    """val200 carved from the TFDS train split after its first ``percent`` % (task_adaptation's
    ``train[{c}:{c}+200]`` with ``c = percent * n // 100``)."""
    c = f"n*{percent}//100"
    return f"{base}[{c}:{c}+200]"


def _tfds(builder: str, version: str, val200: str, test: str, label: str = "label", **extra) -> dict:
    return {"builder": builder, "version": version, "label": label, **extra,
            "splits": {"train800": "train[:800]", "val200": val200, "train800val200": f"train[:800]+{val200}",
                       "test": test}}


# task -> its TFDS source (task_adaptation@d7630d3 task_adaptation/data/<file>: builder, tfds_splits, label function)
TFDS = {
    "cifar100": _tfds("cifar100", "3.*.*", _carved(90), "test"),  # cifar.py, TRAIN_SPLIT_PERCENT = 90
    "caltech101": _tfds("caltech101", "3.*.*", _carved(90), "test"),  # caltech.py, _TRAIN_SPLIT_PERCENT = 90
    "dtd": _tfds("dtd", "3.*.*", "validation[:200]", "test"),  # dtd.py
    "oxford_flowers102": _tfds("oxford_flowers102", "2.*.*", "validation[:200]", "test"),  # oxford_flowers102.py
    "oxford_iiit_pet": _tfds("oxford_iiit_pet", "3.*.*", _carved(80), "test"),  # oxford_iiit_pet.py, 80
    "svhn": _tfds("svhn_cropped", "3.*.*", _carved(90), "test"),  # svhn.py, TRAIN_SPLIT_PERCENT = 90
    "sun397": _tfds("sun397/tfds", "4.*.*", "validation[:200]", "test"),  # sun397.py, config "tfds"
    "patch_camelyon": _tfds("patch_camelyon", "2.*.*", "validation[:200]", "test"),  # patch_camelyon.py
    # eurosat.py / resisc45.py: 60 / 20 / 20 of the TFDS train split; test = the last 20 %
    "eurosat": _tfds("eurosat/rgb", "2.*.*", _carved(60), "train[n*60//100+n*20//100:]"),
    "resisc45": _tfds("resisc45", "3.*.*", _carved(60), "train[n*60//100+n*20//100:]"),
    "diabetic_retinopathy": _tfds("diabetic_retinopathy_detection/btgraham-300", "3.*.*", "validation[:200]",
                                  "test"),  # diabetic_retinopathy.py (no heavy augmentation: the VTAB default)
    # clevr.py: TRAIN_SPLIT_PERCENT = 90, test = TFDS validation; labels _count_preprocess_fn,
    # _closest_object_preprocess_fn
    "clevr_count": _tfds("clevr", "3.*.*", _carved(90), "validation", "clevr-count"),
    "clevr_distance": _tfds("clevr", "3.*.*", _carved(90), "validation", "clevr-closest-distance"),
    "dmlab": _tfds("dmlab", "2.0.1", "validation[:200]", "test"),  # dmlab.py
    "kitti_distance": _tfds("kitti", "3.2.0", "validation[:200]", "test",
                            "kitti-closest-vehicle-distance"),  # kitti.py, _closest_vehicle_distance_pp
    # dsprites.py: 80 / 10 / 10 of TFDS train; label = floordiv(attribute, num_original / 16) (x position: 32/16,
    # orientation: 40/16); image = tile(image, 3) * 255 (TFDS stores the masks as 0/1)
    "dsprites_location": _tfds("dsprites", "2.*.*", _carved(80), "train[n*80//100+n*10//100:]",
                               "floordiv:label_x_position:2", scale=255),
    "dsprites_orientation": _tfds("dsprites", "2.*.*", _carved(80), "train[n*80//100+n*10//100:]",
                                  "floordiv:label_orientation:2.5", scale=255),
    # smallnorb.py: val = first 50 % of TFDS test, test = the rest (VAL_SPLIT_PERCENT = 50; TFDS's "test[50%:]"
    # boundary is round(n / 2), n // 2 for its even 24,300); label = the attribute; image tiled to 3 channels
    "smallnorb_azimuth": _tfds("smallnorb", "2.*.*", "test[:200]", "test[n//2:]", "feature:label_azimuth"),
    "smallnorb_elevation": _tfds("smallnorb", "2.*.*", "test[:200]", "test[n//2:]", "feature:label_elevation"),
}


def _vpt(*names: str) -> tuple[str, ...]:
    """VPT's DATA.NAME (``vtab-`` + task_adaptation's name) and task_adaptation's own name."""
    out = []
    for n in names:
        out += [f"vtab-{n}", n]
    return tuple(out)


# name, NOAH folder, classes, group, test size, aliases, description
VTAB_TASKS = [
    ("cifar100", "cifar", 100, "natural", 10000,
     ("cifar", "cifar-100", "vtab-cifar", "vtab-cifar100") + _vpt("cifar(num_classes=100)"), "CIFAR-100 objects"),
    ("caltech101", "caltech101", 102, "natural", 6084, ("caltech", "vtab-caltech101", "caltech-101"),
     "Caltech-101 objects (101 categories + background)"),
    ("dtd", "dtd", 47, "natural", 1880, ("vtab-dtd", "textures"), "Describable Textures"),
    ("oxford_flowers102", "oxford_flowers102", 102, "natural", 6149,
     ("flowers102", "vtab-oxford_flowers102", "vtab-flowers102", "vtab-flowers"), "Oxford Flowers-102"),
    ("oxford_iiit_pet", "oxford_iiit_pet", 37, "natural", 3669,
     ("oxford_pet", "oxford_pets", "pets", "pet", "vtab-oxford_iiit_pet", "vtab-oxford_pet", "vtab-pets"),
     "Oxford-IIIT Pets"),
    ("svhn", "svhn", 10, "natural", 26032, ("svhn_cropped", "vtab-svhn", "vtab-svhn_cropped"), "SVHN house numbers"),
    ("sun397", "sun397", 397, "natural", 21750, ("sun", "vtab-sun397", "vtab-sun"), "SUN397 scenes"),
    ("patch_camelyon", "patch_camelyon", 2, "specialized", 32768,
     ("camelyon", "pcam", "vtab-patch_camelyon", "vtab-camelyon", "vtab-pcam"), "PatchCamelyon histopathology"),
    ("eurosat", "eurosat", 10, "specialized", 5400, ("vtab-eurosat", "eurosat_rgb"), "EuroSAT satellite land use"),
    ("resisc45", "resisc45", 45, "specialized", 6300, ("resisc", "vtab-resisc45", "vtab-resisc"),
     "RESISC45 remote sensing scenes"),
    ("diabetic_retinopathy", "diabetic_retinopathy", 5, "specialized", 42670,
     ("retinopathy", "vtab-diabetic_retinopathy", "vtab-retinopathy", "diabetic_retinopathy_detection")
     + _vpt('diabetic_retinopathy(config="btgraham-300")'), "Diabetic retinopathy (btgraham-300)"),
    ("clevr_count", "clevr_count", 8, "structured", 15000,
     ("clevr_count_all", "vtab-clevr_count", "vtab-clevr_count_all", "clevr-count")
     + _vpt('clevr(task="count_all")'), "CLEVR object count"),
    ("clevr_distance", "clevr_dist", 6, "structured", 15000,
     ("clevr_dist", "clevr_closest_object_distance", "vtab-clevr_dist", "vtab-clevr_distance")
     + _vpt('clevr(task="closest_object_distance")'), "CLEVR closest-object distance"),
    ("dmlab", "dmlab", 6, "structured", 22735, ("vtab-dmlab",), "DMLab distance"),
    ("kitti_distance", "kitti", 4, "structured", 711,
     ("kitti", "kitti_closest_vehicle_distance", "kitti_dist", "vtab-kitti", "vtab-kitti_distance")
     + _vpt('kitti(task="closest_vehicle_distance")'), "KITTI closest-vehicle distance"),
    ("dsprites_location", "dsprites_loc", 16, "structured", 73728,
     ("dsprites_loc", "dsprites_xpos", "dsprites_x_position", "dsprites_label_x_position", "vtab-dsprites_loc",
      "vtab-dsprites_location") + _vpt('dsprites(predicted_attribute="label_x_position",num_classes=16)'),
     "dSprites x-position"),
    ("dsprites_orientation", "dsprites_ori", 16, "structured", 73728,
     ("dsprites_ori", "dsprites_orient", "dsprites_label_orientation", "vtab-dsprites_ori",
      "vtab-dsprites_orientation") + _vpt('dsprites(predicted_attribute="label_orientation",num_classes=16)'),
     "dSprites orientation"),
    ("smallnorb_azimuth", "smallnorb_azi", 18, "structured", 12150,
     ("smallnorb_azi", "smallnorb_label_azimuth", "vtab-smallnorb_azi", "vtab-smallnorb_azimuth")
     + _vpt('smallnorb(predicted_attribute="label_azimuth")'), "smallNORB azimuth"),
    ("smallnorb_elevation", "smallnorb_ele", 9, "structured", 12150,
     ("smallnorb_ele", "smallnorb_elev", "smallnorb_label_elevation", "vtab-smallnorb_ele",
      "vtab-smallnorb_elevation") + _vpt('smallnorb(predicted_attribute="label_elevation")'),
     "smallNORB elevation"),
]

# The tasks whose VTAB-1k test split is not guaranteed to hold every class.
_INCOMPLETE_TEST = {"kitti_distance"}

for name, folder, classes, group, test_size, aliases, desc in VTAB_TASKS:
    register_task(Task(
        name=name, suite="vtab", num_classes=classes, description=desc, group=group, aliases=aliases,
        folder=folder, split_sizes={"train800": 800, "val200": 200, "train800val200": 1000, "test": test_size},
        complete_splits=() if name in _INCOMPLETE_TEST else ("test",),
        how_to_get=HOW_TO_GET, sources={"tfds": TFDS[name]}))

register_suite(Suite(
    name="vtab", description="VTAB-1k: 19 tasks (natural, specialized, structured), 1000 training images each",
    tasks=tuple(t[0] for t in VTAB_TASKS), protocol="vpt", backbone="vit_base_patch16_224.orig_in21k",
    folder="vtab-1k", aliases=("vtab-1k", "vtab1k"), groups=("natural", "specialized", "structured")))
