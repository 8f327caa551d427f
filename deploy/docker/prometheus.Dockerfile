# Prometheus from Debian's package, on the Debian base that build.sh makes (for machines
# that reach Debian's archive but no image registry). build.sh downloads the package
# and the dependencies the base lacks on the host (mmdebstrap) and puts them in debs/;
# dpkg installs them here without any network. Elsewhere, use prom/prometheus instead.
ARG BASE=phalanx/debian-base:bookworm
FROM ${BASE}
COPY debs/ /tmp/debs/
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
 && dpkg -i /tmp/debs/*.deb \
 && rm -rf /tmp/debs /usr/sbin/policy-rc.d \
 && install -d -o prometheus -g prometheus -m 0755 /prometheus \
 && prometheus --version
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
