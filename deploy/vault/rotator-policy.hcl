# Vault (or OpenBao) policy for rotator, for the default configuration:
#   vault.mount: secret   vault.path_template: "aws/{account_id}/{user_name}"
# With another mount or template, change "secret" and "aws/" below to match.
# No delete, destroy or sudo anywhere: rotator only ever adds versions; earlier
# versions stay in the secret's history for consumers and for audits.
#
#   vault policy write rotator rotator-policy.hcl

# The keys. Each rotation writes a new version with check-and-set: "create" for a
# user's first key, "update" after that; "read" to find the current version and to
# verify what was stored (and to recover after a crash).
path "secret/data/aws/*" {
  capabilities = ["create", "read", "update"]
}

# Custom metadata (access_key_id, rotation_id, rotated_at) lives on the secret, not on
# a version, and is written through the metadata endpoint after each data write;
# "read" shows the versions and their metadata.
path "secret/metadata/aws/*" {
  capabilities = ["create", "read", "update"]
}

# The token's own TTL (to renew it at 2/3 of it) and its renewal. Also in Vault's
# "default" policy; listed here so that the role works with token_no_default_policy.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

# The start-up check that the mount is KV version 2 (what the vault CLI reads too).
path "sys/internal/ui/mounts/secret" {
  capabilities = ["read"]
}

# Needs no policy: the AppRole login (auth/approle/login) and sys/health.
