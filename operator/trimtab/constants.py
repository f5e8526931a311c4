"""Names shared by every layer: the API group, plurals, label keys and the field manager.

Changing a value here changes what is written to clusters, so treat these as API."""

from typing import Final

GROUP: Final = "trimtab.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

MODELDEPLOYMENT_KIND: Final = "ModelDeployment"
MODELDEPLOYMENT_PLURAL: Final = "modeldeployments"
MODELDEPLOYMENT_SHORT: Final = "mdep"
TRAININGJOB_KIND: Final = "TrainingJob"
TRAININGJOB_PLURAL: Final = "trainingjobs"
TRAININGJOB_SHORT: Final = "tj"

FIELD_MANAGER: Final = "trimtab"

LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "trimtab"
LABEL_OWNER: Final = "trimtab.io/owner"
LABEL_REVISION: Final = "trimtab.io/revision"
LABEL_OWNER_KIND: Final = "trimtab.io/owner-kind"
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"

# Set by right-sizing in Auto mode when it applies new resources (kept in status, never in
# spec, so GitOps sees no drift): the annotation change makes the reconcile build the revision.
ANNOTATION_RESOURCES_APPLIED: Final = "trimtab.io/resources-applied"

# On every object trimtab applies: a hash of the manifest it applied last (see
# builders.common.with_applied_hash).
ANNOTATION_APPLIED: Final = "trimtab.io/applied"

# Annotation prefix for kopf's own bookkeeping (progress and diff-base), so kopf writes
# nothing under .status that the CRD schema would prune.
# Not trimtab.io itself: kopf leaves its prefix out of the diffs that fire update handlers, and
# trimtab's own annotations (right-sizing, rollout actions) must fire them.
KOPF_ANNOTATION_PREFIX: Final = "kopf.trimtab.io"
