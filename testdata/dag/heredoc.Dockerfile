FROM registry.example/busybox:1
COPY <<EOF /etc/motd
hello $HOSTNAME
EOF
RUN <<EOT
set -e
echo one > /one
EOT
