"""iSAID patches (``--dataset_file isaid``): COCO json in the generic layout, iSAID's 15 classes.

``scripts/prepare_isaid.py`` cuts the official full-size images into patches and writes
``ROOT/{train,val}/`` and ``ROOT/annotations/instances_{train,val}.json`` with the official
categories. The category ids and names below are those of the official iSAID json (the
devkit's ``labels.py`` / ``preprocess.py``, case as there); id 0 is background. A json whose
categories disagree (another data set, or a converter that renumbered them) is refused, because
a checkpoint's class indices would silently mean other classes.
"""
from __future__ import annotations

from detr_ssl.data.coco import CocoDetection
from detr_ssl.utils.errors import DataError

ISAID_CATEGORIES: dict[int, str] = {
    1: "ship",
    2: "storage_tank",
    3: "baseball_diamond",
    4: "tennis_court",
    5: "basketball_court",
    6: "Ground_Track_Field",
    7: "Bridge",
    8: "Large_Vehicle",
    9: "Small_Vehicle",
    10: "Helicopter",
    11: "Swimming_pool",
    12: "Roundabout",
    13: "Soccer_ball_field",
    14: "plane",
    15: "Harbor",
}
ISAID_NUM_CLASSES = max(ISAID_CATEGORIES) + 1  # 16: classifier size = largest id + 1, as for COCO


def isaid_category_records() -> list[dict]:
    """The 15 categories as COCO json records (supercategory = name, as in the official json)."""
    return [{"id": i, "name": name, "supercategory": name} for i, name in ISAID_CATEGORIES.items()]


class IsaidDetection(CocoDetection):
    """A COCO-json split whose categories must be iSAID's (all 15, or a subset with the same
    ids and names, as the official json lists only the classes that occur); the classifier
    always has 16 outputs, so that every iSAID checkpoint has the same head."""

    def check_categories(self) -> None:
        wrong = [f"id {cat.get('id')!r} '{cat.get('name')}'" for cat in self.coco.dataset.get("categories", [])
                 if ISAID_CATEGORIES.get(cat.get("id")) != cat.get("name")]
        if wrong or not self.coco.cats:
            expected = ", ".join(f"{i} {name}" for i, name in ISAID_CATEGORIES.items())
            found = f"categories not in iSAID: {', '.join(wrong)}" if wrong else "no categories listed"
            raise DataError(f"{self.ann_file}: --dataset_file isaid expects the official iSAID categories "
                             f"({expected}); {found}. Prepare the data with scripts/prepare_isaid.py, or use "
                             "--dataset_file coco for other class lists")

    @property
    def num_classes(self) -> int:
        return ISAID_NUM_CLASSES
