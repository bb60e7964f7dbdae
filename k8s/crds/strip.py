"""Make the committed KubeRay CRD schemas from the operator's full CRD files.

    python3 k8s/crds/strip.py SOURCE_DIR      # SOURCE_DIR: KubeRay's ray-operator/config/crd/bases/

Keeps, per CRD, the served ``ray.io/v1`` version's ``openAPIV3Schema`` (what
tests/unit/test_k8s_manifests.py validates the manifests against) with the ``description``
strings removed; types, properties, required fields, enums, formats and the ``x-kubernetes-*``
markers are kept unchanged. Drops the ``v1alpha1`` version, printer columns and subresources.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

KINDS = ("rayclusters", "rayjobs", "rayservices")
VERSION = "v1"
HEADER = ("# KubeRay {release} CRD {name}, {version} schema only, descriptions removed: made by\n"
          "# k8s/crds/strip.py from ray-operator/config/crd/bases/{file} (see k8s/crds/README.md).\n")
RELEASE = "v1.7.0"


def strip_descriptions(node):
    """The schema without its ``description`` annotations. A ``description`` key whose value is a
    string is an annotation; a field named ``description`` under ``properties`` has a schema
    (a dict) as its value and is kept."""
    if isinstance(node, dict):
        return {key: strip_descriptions(value) for key, value in node.items()
                if not (key == "description" and isinstance(value, str))}
    if isinstance(node, list):
        return [strip_descriptions(value) for value in node]
    return node


def strip_crd(crd: dict) -> dict:
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
    return {
        "apiVersion": crd["apiVersion"], "kind": crd["kind"],
        "metadata": {"name": crd["metadata"]["name"], "annotations": crd["metadata"].get("annotations", {})},
        "spec": {"group": crd["spec"]["group"], "names": crd["spec"]["names"], "scope": crd["spec"]["scope"],
                 "versions": [{"name": version["name"], "served": version["served"], "storage": version["storage"],
                               "schema": strip_descriptions(version["schema"])}]},
    }


def main(source: str) -> None:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    here = Path(__file__).resolve().parent
    for kind in KINDS:
        file = f"ray.io_{kind}.yaml"
        crd = yaml.load((Path(source) / file).read_text(), Loader=loader)
        text = yaml.dump(strip_crd(crd), Dumper=dumper, sort_keys=False, width=120)
        (here / file).write_text(HEADER.format(release=RELEASE, name=crd["metadata"]["name"], version=VERSION,
                                               file=file) + text)


if __name__ == "__main__":
    main(sys.argv[1])
