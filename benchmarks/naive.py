"""The naive per-user loop: the baseline every IAM key-age script starts as.

ListUsers, then per user ListUserTags and ListAccessKeys, then per key
GetAccessKeyLastUsed; a key is due when it is active and older than --max-age-days.
Plain boto3 with its default settings and the standard endpoint/credential chain
(`AWS_ENDPOINT_URL` points it at the benchmark's proxy). Prints one JSON document:

    {"users": 1000, "keys": 1000, "due": ["bench-00000", ...]}
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta

import boto3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="naive per-user IAM key-age loop")
    parser.add_argument("--max-age-days", type=float, default=90.0)
    args = parser.parse_args(argv)
    cutoff = datetime.now(UTC) - timedelta(days=args.max_age_days)

    iam = boto3.client("iam")
    users = keys = 0
    due: list[str] = []
    for page in iam.get_paginator("list_users").paginate():
        for user in page["Users"]:
            users += 1
            name = user["UserName"]
            tags = {
                t["Key"]: t["Value"]
                for tag_page in iam.get_paginator("list_user_tags").paginate(UserName=name)
                for t in tag_page["Tags"]
            }
            if tags.get("rotator:exempt", "false") != "false":
                continue
            for key_page in iam.get_paginator("list_access_keys").paginate(UserName=name):
                for key in key_page["AccessKeyMetadata"]:
                    keys += 1
                    last = iam.get_access_key_last_used(AccessKeyId=key["AccessKeyId"])
                    _ = last.get("AccessKeyLastUsed", {}).get("LastUsedDate")
                    if key["Status"] == "Active" and key["CreateDate"] < cutoff:
                        due.append(name)
    json.dump({"users": users, "keys": keys, "due": sorted(set(due))}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
