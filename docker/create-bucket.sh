#!/bin/sh
# The `create-bucket` one-shot of docker-compose.yml, run in the MinIO client image (mc) once MinIO is
# healthy. Safe to run again on every `docker compose up`:
#   - creates the bucket S3_BUCKET if it is missing, and makes sure it has no anonymous access at all;
#   - creates (or updates) the app's own MinIO user AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY with a
#     policy that reaches this bucket only. The app never uses MinIO's root credentials.
set -eu

: "${STORAGE_URL:?}" "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${S3_BUCKET:?}"
: "${AWS_ACCESS_KEY_ID:?}" "${AWS_SECRET_ACCESS_KEY:?}"
policy_name="${S3_BUCKET}-app"

mc alias set storage "$STORAGE_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "storage/$S3_BUCKET"
mc anonymous set none "storage/$S3_BUCKET"

policy_file="/tmp/$policy_name.json"
printf '%s\n' '{' \
    '  "Version": "2012-10-17",' \
    '  "Statement": [' \
    '    {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"],' \
    "     \"Resource\": [\"arn:aws:s3:::$S3_BUCKET\"]}," \
    '    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],' \
    "     \"Resource\": [\"arn:aws:s3:::$S3_BUCKET/*\"]}" \
    '  ]' \
    '}' >"$policy_file"
mc admin policy create storage "$policy_name" "$policy_file"
rm -f "$policy_file"

mc admin user add storage "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >/dev/null
# Attaching a policy the user already has is an error in mc; on a re-run, check instead.
# (The mc image is minimal: no grep, so the shell matches the text.)
if ! mc admin policy attach storage "$policy_name" --user "$AWS_ACCESS_KEY_ID" 2>/dev/null; then
    user_info="$(mc admin user info storage "$AWS_ACCESS_KEY_ID")"
    case "$user_info" in
        *"$policy_name"*) ;;
        *) echo "could not attach the policy $policy_name to $AWS_ACCESS_KEY_ID" >&2; exit 1 ;;
    esac
fi
echo "bucket $S3_BUCKET is ready (private; the app's user $AWS_ACCESS_KEY_ID may read and write it)"
