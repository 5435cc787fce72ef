#!/usr/bin/env python3
"""Validates the kustomization's objects against their schemas, offline.

Kubernetes kinds: the JSON schemas that the PyPI package `kubernetes-validate` ships, strict
(an unknown field is an error), for the oldest and newest Kubernetes versions named below.
KEDA kinds: the schema of the pydantic models in `cloudcoil-models-keda` (generated from
KEDA's CRDs), made strict the same way. The Secret that kustomize's secretGenerator makes
is checked as made from secrets.env.example.

    usage: validate.py DIR        (needs: pip install -r DIR/requirements.txt)

Prints one line per object; exits 1 if any is invalid. platform/tests/it/deploy.rs runs it.
"""

import os
import sys

import jsonschema
import kubernetes_validate
import yaml
from cloudcoil.models.keda import v1alpha1 as keda

KUBERNETES_VERSIONS = ["1.29", "1.37"]
KEDA_KINDS = {
    "ScaledObject": keda.ScaledObject,
    "TriggerAuthentication": keda.TriggerAuthentication,
}


def strict(schema):
    """Every object with named properties accepts no others (as kubernetes-validate's
    strict schemas do); free-form maps (labels, trigger metadata) stay as they are."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for v in schema.values():
            strict(v)
    elif isinstance(schema, list):
        for v in schema:
            strict(v)
    return schema


def keda_validator(model):
    schema = strict(model.model_json_schema(by_alias=True, mode="validation"))
    return jsonschema.Draft202012Validator(schema)


def objects(root):
    with open(os.path.join(root, "kustomization.yaml")) as f:
        kustomization = yaml.safe_load(f)
    for name in kustomization["resources"]:
        with open(os.path.join(root, name)) as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    yield name, doc
    for gen in kustomization.get("secretGenerator", []):
        data = {}
        for env in gen.get("envs", []):
            with open(os.path.join(root, env + ".example")) as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        key, _, value = line.partition("=")
                        data[key] = value
        yield "secretGenerator", {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": gen["name"]},
            "type": "Opaque",
            "stringData": data,
        }


def main():
    root = sys.argv[1]
    validators = {kind: keda_validator(model) for kind, model in KEDA_KINDS.items()}
    bad = 0
    for source, doc in objects(root):
        what = f"{source}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        errors = []
        if doc.get("apiVersion") == "keda.sh/v1alpha1":
            validator = validators.get(doc.get("kind"))
            if validator is None:
                errors.append("no schema for this KEDA kind")
            else:
                errors += [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                           for e in validator.iter_errors(doc)]
            checked = "KEDA (cloudcoil-models-keda)"
        else:
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    errors.append(f"{version}: {'/'.join(map(str, e.path))}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    errors.append(e.message)
            checked = "Kubernetes " + " and ".join(KUBERNETES_VERSIONS)
        if errors:
            bad += 1
            print(f"INVALID {what}")
            for e in errors:
                print(f"    {e}")
        else:
            print(f"valid   {what} ({checked})")
    if bad:
        print(f"{bad} invalid objects")
        sys.exit(1)


if __name__ == "__main__":
    main()
