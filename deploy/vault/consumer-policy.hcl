# Example policy for one consumer of a rotated key: the application that uses IAM user
# "app-deployer" of account 111122223333 reads its current key, and nothing else.
# One policy per consumer; never grant a consumer "secret/data/aws/*".
#
#   vault policy write app-deployer consumer-policy.hcl
#
# The latest version's data holds aws_access_key_id and aws_secret_access_key; the
# response's metadata block also carries the custom metadata (access_key_id,
# rotation_id, rotated_at), so no access to the metadata endpoint is needed.
# Consumers read the latest version each time (Vault Agent templates re-render when
# it changes): policy.overlap in rotator's configuration is how long they have.
path "secret/data/aws/111122223333/app-deployer" {
  capabilities = ["read"]
}
