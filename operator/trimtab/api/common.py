"""Types shared by ModelDeployment and TrainingJob: the strict base model, containers' bits
(env, tolerations, resources) and the status condition.

Field names are camelCase on the wire (aliases) and snake_case in Python."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from trimtab.api.quantity import QUANTITY_PATTERN

Quantity = Annotated[
    str,
    StringConstraints(pattern=QUANTITY_PATTERN),
    Field(description='A Kubernetes quantity, e.g. "500m", "4", "16Gi".'),
]
DNSLabel = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
]
# What most object names are (PersistentVolumeClaims, ConfigMaps, Secrets): dots allowed.
DNSSubdomain = Annotated[
    str,
    StringConstraints(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        max_length=253,
    ),
]
# A label value (a node selector's): up to 63 of [A-Za-z0-9-_.], alphanumeric at both ends.
LabelValue = Annotated[
    str,
    StringConstraints(pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$", max_length=63),
]
# A duration as Go and Prometheus write it: "30s", "5m", "1h30m".
Duration = Annotated[
    str,
    StringConstraints(pattern=r"^([0-9]+(ms|s|m|h))+$"),
    Field(description='A duration such as "30s", "5m" or "1h30m".'),
]


class StrictModel(BaseModel):
    """A spec fragment: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_assignment=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The JSON the API server stores: camelCase, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusModel(BaseModel):
    """A status fragment: camelCase, lenient on read so an older operator survives newer status."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# A label or annotation key: an optional DNS-subdomain prefix and "/", then a name of up to 63
# characters.
# An HTTP header's name (RFC 9110's token), and a value without a line break or NUL (which
# would end the header and start another).
HTTP_HEADER_NAME = r"^[-!#$%&'*+.^_`|~0-9A-Za-z]+$"
HTTP_HEADER_VALUE = r"^[^\r\n\x00]*$"


def header_problem(name: str, value: str) -> str | None:
    """What is wrong with the HTTP header `name: value`, or None.

    >>> header_problem("X-Scope-OrgID", "team-a") is None
    True
    >>> header_problem("X Scope", "a"), header_problem("X-Tenant", "a\\r\\nX-Evil: 1")
    ("'X Scope' is not an HTTP header name", 'the value of header X-Tenant has a line break or NUL')
    """
    if not re.fullmatch(HTTP_HEADER_NAME, name):
        return f"{name!r} is not an HTTP header name"
    if not re.fullmatch(HTTP_HEADER_VALUE, value):
        return f"the value of header {name} has a line break or NUL"
    return None


QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)


@dataclass(frozen=True)
class ReservedKeys:
    """Pod label and annotation keys a workload's builder writes itself (or that a controller
    acting on its pods reads), which the user's podMetadata may not set; `*_why` say why."""

    labels: tuple[str, ...]
    label_prefixes: tuple[str, ...]
    labels_why: str
    annotation_prefixes: tuple[str, ...]
    annotations_why: str

    @staticmethod
    def _listed(exact: tuple[str, ...], prefixes: tuple[str, ...]) -> str:
        names = [f"{p}*" for p in prefixes] + list(exact)
        return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]

    def labels_message(self) -> str:
        return f"labels: {self._listed(self.labels, self.label_prefixes)} are {self.labels_why}"

    def annotations_message(self) -> str:
        listed = self._listed((), self.annotation_prefixes)
        return f"annotations: {listed} are {self.annotations_why}"

    def label_held(self, key: str) -> bool:
        return key in self.labels or key.startswith(self.label_prefixes)

    def annotation_held(self, key: str) -> bool:
        return key.startswith(self.annotation_prefixes)


def _reserved_rule(field: str, exact: tuple[str, ...], prefixes: tuple[str, ...]) -> str:
    held = " && ".join(
        [*(f"k != '{key}'" for key in exact), *(f"!k.startsWith('{p}')" for p in prefixes)]
    )
    return f"!has(self.{field}) || self.{field}.all(k, {held})"


def pod_metadata_rules(reserved: ReservedKeys) -> dict[str, Any]:
    """The CEL rules of a podMetadata field: keys as the API server takes them, and none of
    `reserved`."""
    return {
        "x-kubernetes-validations": [
            {
                "rule": "(!has(self.labels) || self.labels.all(k, size(k) <= 317 && "
                f'k.matches(r"""{QUALIFIED_NAME}"""))) && (!has(self.annotations) '
                "|| self.annotations.all(k, size(k) <= 317 && "
                f'k.matches(r"""{QUALIFIED_NAME}""")))',
                "message": "a label or annotation key is an optional DNS prefix and '/', "
                "then a name of up to 63 letters, digits, '-', '_' and '.'",
            },
            {
                "rule": _reserved_rule("labels", reserved.labels, reserved.label_prefixes),
                "message": reserved.labels_message(),
            },
            {
                "rule": _reserved_rule("annotations", (), reserved.annotation_prefixes),
                "message": reserved.annotations_message(),
            },
        ]
    }


class PodMetadataBase(StrictModel):
    """Labels and annotations a workload's pods carry besides trimtab's own. A subclass names
    its `reserved` keys and sets `model_config` from `pod_metadata_rules` of them."""

    reserved: ClassVar[ReservedKeys]

    labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=64)
    annotations: dict[str, Annotated[str, StringConstraints(max_length=4096)]] = Field(
        default_factory=dict, max_length=64
    )

    @model_validator(mode="after")
    def _as_the_api_server_checks(self) -> PodMetadataBase:
        for key in [*self.labels, *self.annotations]:
            if len(key) > 317 or not re.fullmatch(QUALIFIED_NAME, key):
                raise ValueError(f"{key!r} is not a valid label or annotation key")
        held = self.reserved
        for key in self.labels:
            if held.label_held(key):
                raise ValueError(f"label {key}: {held.labels_message()}")
        for key in self.annotations:
            if held.annotation_held(key):
                raise ValueError(f"annotation {key}: {held.annotations_message()}")
        return self


class KeyRef(StrictModel):
    name: str = Field(description="Name of the Secret or ConfigMap.")
    key: str = Field(description="Key within it.")
    optional: bool | None = None


class FieldRef(StrictModel):
    field_path: str = Field(description='A pod field, e.g. "metadata.name" or "status.podIP".')


class EnvVarSource(StrictModel):
    secret_key_ref: KeyRef | None = None
    config_map_key_ref: KeyRef | None = None
    field_ref: FieldRef | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.secretKeyRef), has(self.configMapKeyRef), "
                    "has(self.fieldRef)].filter(x, x).size() == 1",
                    "message": "valueFrom needs exactly one of secretKeyRef, configMapKeyRef, "
                    "fieldRef",
                }
            ]
        }
    )


class EnvVar(StrictModel):
    name: str = Field(min_length=1, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = None
    value_from: EnvVarSource | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.value) && has(self.valueFrom))",
                    "message": "env: set value or valueFrom, not both",
                }
            ]
        }
    )


class Toleration(StrictModel):
    """A pod toleration, held to the pod validation's rules."""

    # The rules below are the API server's for pods: a toleration it would refuse in the pods
    # trimtab creates is refused when the resource is applied, where the user sees why.

    key: str | None = Field(default=None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.operator) || self.operator != 'Exists' "
                    "|| !has(self.value) || self.value == ''",
                    "message": "a toleration with operator Exists takes no value",
                },
                {
                    "rule": "(has(self.key) && self.key != '') "
                    "|| (has(self.operator) && self.operator == 'Exists')",
                    "message": "a toleration without a key must have operator Exists",
                },
                {
                    "rule": "!has(self.tolerationSeconds) "
                    "|| (has(self.effect) && self.effect == 'NoExecute')",
                    "message": "tolerationSeconds applies to effect NoExecute only",
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _as_the_api_server_checks(self) -> Toleration:
        # The CEL rules above, for a spec that reached the operator without the CRD's checks.
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists takes no value")
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key must have operator Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds applies to effect NoExecute only")
        return self


class Resources(StrictModel):
    """Per-replica resources. Requests are what the scheduler reserves; trimtab right-sizes them."""

    cpu: Quantity | None = Field(default=None, description="CPU request per replica.")
    memory: Quantity | None = Field(default=None, description="Memory request per replica.")
    cpu_limit: Quantity | None = Field(
        default=None, description="CPU limit; unset by default so replicas are never throttled."
    )
    memory_limit: Quantity | None = Field(
        default=None, description="Memory limit; defaults to the memory request."
    )
    gpu: int = Field(default=0, ge=0, le=64, description="Whole GPUs per replica.")
    gpu_resource_name: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$",
        description='Extended resource for GPUs; default "nvidia.com/gpu". MIG profiles too, '
        'e.g. "nvidia.com/mig-1g.10gb".',
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.gpuResourceName) || self.gpu > 0",
                    "message": "resources.gpuResourceName is set but resources.gpu is 0",
                    "fieldPath": ".gpuResourceName",
                },
            ]
        }
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """A Kubernetes-style condition; lastTransitionTime moves only when status changes."""

    type: str
    status: ConditionStatus
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


# --- volumes: a safe subset of the pod's volume sources --------------------------------------


class PersistentVolumeClaimSource(StrictModel):
    claim_name: DNSSubdomain = Field(
        description="A PersistentVolumeClaim in the same namespace."
    )
    read_only: bool | None = None


class EmptyDirSource(StrictModel):
    medium: Literal["", "Memory"] | None = Field(
        default=None, description='"Memory" for a tmpfs (e.g. a large /dev/shm for NCCL).'
    )
    size_limit: Quantity | None = None


class KeyToPath(StrictModel):
    key: str = Field(min_length=1)
    path: str = Field(min_length=1, pattern=r"^[^/]")


class ConfigMapSource(StrictModel):
    name: DNSSubdomain
    items: list[KeyToPath] | None = Field(default=None, max_length=64)
    optional: bool | None = None


class SecretSource(StrictModel):
    secret_name: DNSSubdomain
    items: list[KeyToPath] | None = Field(default=None, max_length=64)
    optional: bool | None = None


class Volume(StrictModel):
    """A pod volume. Only claims, scratch space, ConfigMaps and Secrets: no hostPath, no
    projected service account tokens, nothing that reaches outside the namespace."""

    name: DNSLabel
    persistent_volume_claim: PersistentVolumeClaimSource | None = None
    empty_dir: EmptyDirSource | None = None
    config_map: ConfigMapSource | None = None
    secret: SecretSource | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.persistentVolumeClaim), has(self.emptyDir), "
                    "has(self.configMap), has(self.secret)].filter(x, x).size() == 1",
                    "message": "volumes: set exactly one of persistentVolumeClaim, emptyDir, "
                    "configMap, secret",
                }
            ]
        }
    )


class VolumeMount(StrictModel):
    name: DNSLabel = Field(description="The name of a volume in spec.volumes.")
    mount_path: str = Field(pattern=r"^/", max_length=1024)
    read_only: bool | None = None
    sub_path: str | None = Field(default=None, pattern=r"^[^/]", max_length=1024)


def validation_problems(err: ValidationError) -> list[str]:
    """A spec the models refuse, as the problems status names: one per field, each
    `spec.<field path>: <what is wrong>`."""
    return [f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]


SpecModel = TypeVar("SpecModel", bound=BaseModel)


def checked_model(
    model: type[SpecModel],
    raw: Mapping[str, Any],
    find_problems: Callable[[SpecModel], list[str]],
) -> tuple[SpecModel | None, list[str]]:
    """A spec as the operator reads it (None if `model` refuses it), and the problems that make
    it unusable, each naming the field: the model's errors, else `find_problems`'."""
    try:
        spec = model.model_validate(dict(raw))
    except ValidationError as err:
        return None, validation_problems(err)
    return spec, find_problems(spec)
