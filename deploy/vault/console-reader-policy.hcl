# Example policy for the people allowed to sign in as IAM user "break-glass-admin" of
# account 111122223333 with its console password: they read the password rotator
# stores (data key "password"), and nothing else: not the user's access key, not
# another user's password.
#
#   vault policy write break-glass-console console-reader-policy.hcl
#   bao kv get -mount=secret -field=password aws/111122223333/break-glass-admin/console
#
# Earlier passwords stay in the version history (`-version=N`), readable through the
# same path. The console asks for a new password at the first sign-in after each
# rotation (rotator sets "require password reset").
path "secret/data/aws/111122223333/break-glass-admin/console" {
  capabilities = ["read"]
}
