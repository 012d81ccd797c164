"""VTAB-1k: 19 tasks in 3 groups (spec §7.1), read from NOAH's exported layout.

    <data-root>/vtab-1k/<folder>/{train800,val200,train800val200,test}.txt   "<image path> <label>"
    <data-root>/vtab-1k/<folder>/images/...

Canonical names follow the E^2VPT/VPT commands; folder names are NOAH's; aliases cover the names
other repositories use.
"""
from peftbench.task import Suite, Task, register_suite, register_task

HOW_TO_GET = ("VTAB-1k is not downloadable here: get NOAH's exported VTAB-1k archive (or run "
              "`peftbench data prepare --suite vtab`) and pass --data-root DIR so that DIR/vtab-1k/<task>/ exists.")

# name, NOAH folder, classes, group, aliases, description
VTAB_TASKS = [
    ("cifar100", "cifar", 100, "natural", ("cifar", "cifar-100", "vtab-cifar"), "CIFAR-100 objects"),
    ("caltech101", "caltech101", 102, "natural", ("caltech", "vtab-caltech101"), "Caltech-101 objects"),
    ("dtd", "dtd", 47, "natural", ("vtab-dtd",), "Describable Textures"),
    ("oxford_flowers102", "oxford_flowers102", 102, "natural", ("flowers102", "vtab-oxford_flowers102"),
     "Oxford Flowers-102"),
    ("oxford_iiit_pet", "oxford_iiit_pet", 37, "natural", ("oxford_pet", "pets", "vtab-oxford_iiit_pet"),
     "Oxford-IIIT Pets"),
    ("svhn", "svhn", 10, "natural", ("svhn_cropped", "vtab-svhn"), "SVHN house numbers"),
    ("sun397", "sun397", 397, "natural", ("sun", "vtab-sun397"), "SUN397 scenes"),
    ("patch_camelyon", "patch_camelyon", 2, "specialized", ("camelyon", "pcam", "vtab-patch_camelyon"),
     "PatchCamelyon histopathology"),
    ("eurosat", "eurosat", 10, "specialized", ("vtab-eurosat",), "EuroSAT satellite land use"),
    ("resisc45", "resisc45", 45, "specialized", ("resisc", "vtab-resisc45"), "RESISC45 remote sensing scenes"),
    ("diabetic_retinopathy", "diabetic_retinopathy", 5, "specialized",
     ("retinopathy", "vtab-diabetic_retinopathy"), "Diabetic retinopathy (btgraham-300)"),
    ("clevr_count", "clevr_count", 8, "structured", ("clevr_count_all", "vtab-clevr_count"), "CLEVR object count"),
    ("clevr_distance", "clevr_dist", 6, "structured", ("clevr_dist", "clevr_closest_object_distance",
                                                        "vtab-clevr_dist"), "CLEVR closest-object distance"),
    ("dmlab", "dmlab", 6, "structured", ("vtab-dmlab",), "DMLab distance"),
    ("kitti_distance", "kitti", 4, "structured", ("kitti", "kitti_closest_vehicle_distance", "vtab-kitti"),
     "KITTI closest-vehicle distance"),
    ("dsprites_location", "dsprites_loc", 16, "structured", ("dsprites_loc", "dsprites_xpos", "vtab-dsprites_loc"),
     "dSprites x-position"),
    ("dsprites_orientation", "dsprites_ori", 16, "structured",
     ("dsprites_ori", "dsprites_orient", "vtab-dsprites_ori"), "dSprites orientation"),
    ("smallnorb_azimuth", "smallnorb_azi", 18, "structured", ("smallnorb_azi", "vtab-smallnorb_azi"),
     "smallNORB azimuth"),
    ("smallnorb_elevation", "smallnorb_ele", 9, "structured", ("smallnorb_ele", "vtab-smallnorb_ele"),
     "smallNORB elevation"),
]

for name, folder, classes, group, aliases, desc in VTAB_TASKS:
    register_task(Task(
        name=name, suite="vtab", num_classes=classes, description=desc, group=group, aliases=aliases,
        folder=folder, split_sizes={"train800": 800, "val200": 200, "train800val200": 1000},
        how_to_get=HOW_TO_GET))

register_suite(Suite(
    name="vtab", description="VTAB-1k: 19 tasks (natural, specialized, structured), 1000 training images each",
    tasks=tuple(t[0] for t in VTAB_TASKS), protocol="vpt", backbone="vit_base_patch16_224.orig_in21k",
    folder="vtab-1k", aliases=("vtab-1k", "vtab1k")))
