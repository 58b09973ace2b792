ARG BASE=registry.example/busybox:1
FROM $BASE AS build
ARG VERSION=1.0
WORKDIR /src
COPY . .
RUN make VERSION=$VERSION
RUN --network=none make test

FROM scratch AS unused
COPY nothing /

FROM registry.example/busybox:1
ENV APP=/app
COPY --from=build --chown=1000:1000 /src/out $APP/
USER 1000
CMD ["/app/out"]
