"""schemathesis hooks for tests/schemathesis.sh (loaded through SCHEMATHESIS_HOOKS).

One rule of the admin API cannot be written in JSON Schema: the names in a key's
`ratelimits` must be unique (`uniqueItems` compares whole items, and two limits that
differ only in `limit` or `duration` are still a conflict). keygate refuses such a body
with 400 `invalid_field`, which positive_data_acceptance would take for a schema-valid
request rejected. So cases carrying duplicate limit names are not generated; the rule
itself is tested in src/admin/router/tests.rs. The entries of an import
(`POST /v1/api-keys/import`, `keys[i].ratelimits`) follow the same rule.
"""

import schemathesis


def _duplicate_limit_names(body):
    if not isinstance(body, dict):
        return False
    # An import carries a create body per entry.
    entries = body.get("keys")
    if isinstance(entries, list) and any(_duplicate_limit_names(e) for e in entries):
        return True
    limits = body.get("ratelimits")
    if not isinstance(limits, list):
        return False
    names = [item.get("name") for item in limits if isinstance(item, dict)]
    names = [name for name in names if isinstance(name, str)]
    return len(names) != len(set(names))


@schemathesis.hook
def filter_case(context, case):
    return not _duplicate_limit_names(case.body)
