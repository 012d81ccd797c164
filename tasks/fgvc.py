"""FGVC: five fine-grained datasets read from VPT's JSON split layout (spec §7.2).

    <data-root>/fgvc/<folder>/{train,val,test}.json   {"<relative image path>": <class id>, ...}

Training images are augmented (Resize 256 → RandomCrop 224 → horizontal flip); evaluation uses
Resize 256 → CenterCrop 224. Selection on val, final runs train on train and report test.
"""
from peftbench.task import Suite, Task, register_suite, register_task

HOW_TO_GET = ("FGVC needs each dataset's images and VPT's split JSON files; see `peftbench data prepare "
              "--suite fgvc` and pass --data-root DIR so that DIR/fgvc/<dataset>/ exists.")

# name, folder, classes, image sub-folder, aliases, description
FGVC_TASKS = [
    ("cub200", "CUB_200_2011", 200, "images", ("cub", "CUB", "cub_200_2011", "cub-200-2011"), "CUB-200-2011 birds"),
    ("nabirds", "nabirds", 555, "images", ("NABirds",), "NABirds"),
    ("oxford_flowers", "OxfordFlower", 102, "", ("OxfordFlowers", "OxfordFlower", "flowers"), "Oxford Flowers"),
    ("stanford_dogs", "Stanford-dogs", 120, "Images", ("StanfordDogs", "dogs"), "Stanford Dogs"),
    ("stanford_cars", "Stanford-cars", 196, "", ("StanfordCars", "cars"), "Stanford Cars"),
]

for name, folder, classes, image_root, aliases, desc in FGVC_TASKS:
    register_task(Task(
        name=name, suite="fgvc", num_classes=classes, description=desc, aliases=aliases, folder=folder,
        layout="fgvc-json", image_root=image_root, augment="crop-flip",
        splits={"search": ("train", "val"), "final": ("train", "test")}, how_to_get=HOW_TO_GET))

register_suite(Suite(
    name="fgvc", description="FGVC: CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars",
    tasks=tuple(t[0] for t in FGVC_TASKS), protocol="vpt", backbone="vit_base_patch16_224.orig_in21k",
    folder="fgvc"))
