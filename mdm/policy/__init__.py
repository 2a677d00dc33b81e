"""ACL policies: TOML rules that decide each principal's access level on each resource.

``load_policy`` reads and validates a directory, :class:`Policy` decides and explains,
:class:`PolicyResolver` serves decisions to the bridge and reloads edited files, and
``mdm.policy.testing`` runs the test cases kept beside the policies. See docs/POLICY.md.
"""

from mdm.access.identity import principal_from_claims
from mdm.policy.evaluate import (
    DEFAULT_DENY,
    Explanation,
    Policy,
    RuleOutcome,
    explain_text,
)
from mdm.policy.load import load_policy
from mdm.policy.model import PolicyError, Problem, Rule
from mdm.policy.resolver import PolicyResolver

__all__ = [
    "DEFAULT_DENY",
    "Explanation",
    "Policy",
    "PolicyError",
    "PolicyResolver",
    "Problem",
    "Rule",
    "RuleOutcome",
    "explain_text",
    "load_policy",
    "principal_from_claims",
]
