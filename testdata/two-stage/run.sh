#!/bin/sh
echo "two-stage says: $(cat /app/built.txt | head -n1) in $MODE"
