# shellcheck shell=bash
# The `registry` service of scripts/dev-services: Apicurio Registry 3 with
# in-memory storage, answering the Confluent schema registry REST API on
#   http://127.0.0.1:$EVGATE_REGISTRY_PORT/apis/ccompat/v7
#
# Sourced by scripts/dev-services, whose helpers it uses (say, err, now,
# elapsed, svc_dir, logfile, launch, java_major, port_held, $CACHE, $HOST).
# It lives in its own file so that the registry's parts stay together and
# dev-services only names it in its lists.
#
# The application comes from Maven Central once (scripts/schema-registry/
# pom.xml: Apicurio's published Quarkus distribution, ~160 MB) into
# $EVGATE_CACHE/apicurio-registry-<version>/. Apicurio 3.3 is compiled for
# Java 21, so the registry runs on the newest Java >= 21 found (see
# registry_find_java); Kafka keeps its Java 17.

REGISTRY_PORT="${EVGATE_REGISTRY_PORT:-8085}"
REGISTRY_HEAP="${EVGATE_REGISTRY_HEAP:-384m}"
REGISTRY_TIMEOUT="${EVGATE_REGISTRY_TIMEOUT:-120}"
REGISTRY_POM="$here/schema-registry/pom.xml"
REGISTRY_VERSION="$(sed -n 's:.*<apicurio.version>\(.*\)</apicurio.version>.*:\1:p' "$REGISTRY_POM" 2>/dev/null | head -n 1)"
REGISTRY_HOME="$CACHE/apicurio-registry-${REGISTRY_VERSION:-unknown}"
REGISTRY_JAVA_MIN=21

# registry_url: the Confluent-compatible base URL clients use.
registry_url() {
    printf 'http://%s:%s/apis/ccompat/v7' "$HOST" "$REGISTRY_PORT"
}

# registry_env: shell assignments for `dev-services env`.
registry_env() {
    printf 'EVGATE_SCHEMA_REGISTRY_URL=%s\n' "$(registry_url)"
}

# registry_find_java: the java to run the registry with: $EVGATE_REGISTRY_JAVA_HOME,
# then $JAVA_HOME, then the newest JDK under /usr/lib/jvm, then java on PATH;
# the first of Java 21 or newer.
registry_find_java() {
    local candidates=() c major best="" bestMajor=0
    [ -n "${EVGATE_REGISTRY_JAVA_HOME:-}" ] && candidates+=("$EVGATE_REGISTRY_JAVA_HOME/bin/java")
    [ -n "${JAVA_HOME:-}" ] && candidates+=("$JAVA_HOME/bin/java")
    for c in /usr/lib/jvm/*/bin/java; do
        [ -x "$c" ] && candidates+=("$c")
    done
    c="$(command -v java 2>/dev/null || true)"
    [ -n "$c" ] && candidates+=("$c")
    for c in "${candidates[@]}"; do
        [ -x "$c" ] || continue
        major="$(java_major "$c")"
        [ -n "$major" ] || continue
        if [ "$major" -ge "$REGISTRY_JAVA_MIN" ]; then
            # an explicit choice wins over a newer JDK found by looking around
            if [ -n "${EVGATE_REGISTRY_JAVA_HOME:-}" ] && [ "$c" = "$EVGATE_REGISTRY_JAVA_HOME/bin/java" ]; then
                echo "$c"
                return 0
            fi
            if [ "$major" -gt "$bestMajor" ]; then
                best="$c"
                bestMajor="$major"
            fi
        fi
    done
    [ -n "$best" ] && echo "$best"
}

# Fetch and unpack the registry once (atomic: a half-done fetch is never
# mistaken for a complete one).
registry_fetch() {
    if [ -f "$REGISTRY_HOME/.complete" ] && [ -f "$REGISTRY_HOME/quarkus-run.jar" ]; then
        return 0
    fi
    if ! command -v mvn >/dev/null 2>&1; then
        err "registry: mvn not found (needed once to fetch Apicurio Registry $REGISTRY_VERSION into $REGISTRY_HOME); run scripts/install-system-deps"
        return 1
    fi
    local tmp flog t0
    t0="$(now)"
    mkdir -p "$CACHE" "$(svc_dir registry)" || return 1
    tmp="$(mktemp -d "$CACHE/.registry-fetch.XXXXXX")" || return 1
    flog="$(svc_dir registry)/maven-fetch.log"
    say "registry: fetching Apicurio Registry $REGISTRY_VERSION (~160 MB) from Maven Central (one time); log $flog"
    # -DskipExternalRepos: Apicurio's parent pom adds two repositories
    # outside Maven Central unless that property is set.
    if ! mvn -B -Dstyle.color=never -DskipExternalRepos -f "$REGISTRY_POM" dependency:unpack@registry \
            -Dregistry.dir="$tmp/app" >"$flog" 2>&1 \
        || [ ! -f "$tmp/app/quarkus-run.jar" ]; then
        rm -rf "$tmp"
        err "registry: fetching Apicurio Registry with Maven failed; see $flog"
        return 1
    fi
    say "registry: fetched in $(elapsed "$t0")s; installing into $REGISTRY_HOME"
    rm -rf "$REGISTRY_HOME"
    if ! { mv "$tmp/app" "$REGISTRY_HOME" && touch "$REGISTRY_HOME/.complete"; }; then
        rm -rf "$tmp"
        err "registry: could not move the fetched registry into $REGISTRY_HOME"
        return 1
    fi
    rm -rf "$tmp"
    say "registry: Apicurio Registry $REGISTRY_VERSION ($(du -sh "$REGISTRY_HOME" | cut -f1)) ready in $REGISTRY_HOME after $(elapsed "$t0")s"
}

start_registry() {
    local java d
    if [ -z "$REGISTRY_VERSION" ]; then
        err "registry: cannot read <apicurio.version> from $REGISTRY_POM"
        return 1
    fi
    java="$(registry_find_java)"
    if [ -z "$java" ]; then
        err "registry: no Java $REGISTRY_JAVA_MIN or newer found (Apicurio Registry $REGISTRY_VERSION needs it; looked at \$EVGATE_REGISTRY_JAVA_HOME, \$JAVA_HOME, /usr/lib/jvm/*, PATH)"
        return 1
    fi
    registry_fetch || return 1
    d="$(svc_dir registry)"
    mkdir -p "$d" || return 1
    say "registry: starting on Java $(java_major "$java") ($java)"
    # Storage: Apicurio 3's default, SQL on an in-memory H2 database
    # (apicurio.storage.kind=sql, apicurio.storage.sql.kind=h2): nothing is
    # written to disk, and a restart starts empty. Ids in the Confluent API
    # are content ids (legacy-id-mode off), as Confluent's own registry does.
    # Tiered compilation stops at C1 and the serial GC: a test rig on a small
    # machine wants a fast start and a small footprint, not peak throughput.
    local -a jvm=(-Xms64m "-Xmx$REGISTRY_HEAP" -XX:+UseSerialGC -XX:TieredStopAtLevel=1
        -Djava.awt.headless=true
        "-Dquarkus.http.host=$HOST" "-Dquarkus.http.port=$REGISTRY_PORT"
        -Dquarkus.http.access-log.enabled=false
        -Dapicurio.storage.kind=sql -Dapicurio.storage.sql.kind=h2
        -Dapicurio.datasource.jdbc.initial-size=2
        "-Dapicurio.storage.snapshot.location=$d")
    if [ -n "${EVGATE_REGISTRY_JVM_OPTS:-}" ]; then
        # shellcheck disable=SC2206  # word splitting of extra JVM options is intended
        jvm+=($EVGATE_REGISTRY_JVM_OPTS)
    fi
    (cd "$d" && launch registry "$java" "${jvm[@]}" -jar "$REGISTRY_HOME/quarkus-run.jar")
}

probe_registry() {
    port_held "$REGISTRY_PORT" || return 1
    if command -v curl >/dev/null 2>&1; then
        curl -sf -m 5 -o /dev/null "$(registry_url)/subjects"
    else
        # shellcheck disable=SC2016
        timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1" && printf "GET /apis/ccompat/v7/subjects HTTP/1.0\r\nHost: $0\r\n\r\n" >&3 && head -n 1 <&3 | grep -q " 200 "' "$HOST" "$REGISTRY_PORT"
    fi
}
