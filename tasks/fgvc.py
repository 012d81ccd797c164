"""FGVC: five fine-grained datasets read from VPT's JSON split layout (docs/protocols.md §11).

    <data-root>/fgvc/<folder>/{train,val,test}.json   {"<image path>": <class id>, ...}
    <data-root>/fgvc/<folder>/<image sub-folder>/<image path>

Folders and image sub-folders follow VPT (``src/data/datasets/json_dataset.py``):

    task            folder          images under         VPT DATA.NAME
    cub200          CUB_200_2011    images/              CUB
    nabirds         nabirds         images/              nabirds
    oxford_flowers  OxfordFlower    (the folder itself)  OxfordFlowers
    stanford_dogs   Stanford-dogs   Images/              StanfordDogs
    stanford_cars   Stanford-cars   (the folder itself)  StanfordCars

Class ids in the JSON files are mapped to 0..C-1 by sorted order, as VPT does (see
:mod:`peftbench.data.layouts.vpt_json`), so 0- and 1-based files both work.

Training images are augmented (Resize 256 → RandomCrop 224 → horizontal flip); evaluation uses
Resize 256 → CenterCrop 224 (``preprocess="resize-crop"``; what is cached and the one approximation
are described in :mod:`peftbench.data`). Selection on val, final runs train on train and report test.
Every class must occur in train and in test; split sizes are not checked (VPT's JSON split files are
no longer downloadable and their exact counts could not be verified, docs/protocols.md §15).
"""
from peftbench.tasks import Suite, Task, register_suite, register_task

HOW_TO_GET = ("FGVC needs each dataset's images and VPT's split JSON files; see `peftbench data prepare "
              "--suite fgvc` and pass --data-root DIR so that DIR/fgvc/<dataset>/ exists.")

# name, folder, classes, image sub-folder, aliases, description
FGVC_TASKS = [
    ("cub200", "CUB_200_2011", 200, "images",
     ("cub", "CUB", "cub_200_2011", "cub-200-2011", "cub200_2011", "cub_200", "birds"), "CUB-200-2011 birds"),
    ("nabirds", "nabirds", 555, "images", ("NABirds", "na_birds"), "NABirds"),
    ("oxford_flowers", "OxfordFlower", 102, "",
     ("OxfordFlowers", "OxfordFlower", "flowers", "fgvc-flowers", "oxford_flower"), "Oxford Flowers"),
    ("stanford_dogs", "Stanford-dogs", 120, "Images", ("StanfordDogs", "dogs", "Stanford-dogs", "stanford_dog"),
     "Stanford Dogs"),
    ("stanford_cars", "Stanford-cars", 196, "", ("StanfordCars", "cars", "Stanford-cars", "stanford_car"),
     "Stanford Cars"),
]

for name, folder, classes, image_root, aliases, desc in FGVC_TASKS:
    register_task(Task(
        name=name, suite="fgvc", num_classes=classes, description=desc, aliases=aliases, folder=folder,
        layout="fgvc-json", image_root=image_root, augment="crop-flip", preprocess="resize-crop",
        complete_splits=("train", "test"),
        splits={"search": ("train", "val"), "final": ("train", "test")}, how_to_get=HOW_TO_GET))

register_suite(Suite(
    name="fgvc", description="FGVC: CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars",
    tasks=tuple(t[0] for t in FGVC_TASKS), protocol="vpt", backbone="vit_base_patch16_224.orig_in21k",
    folder="fgvc"))
