/*
 * Embedding fogcdn in a native player through the C ABI: start the proxy, turn an origin URL into the
 * URL the player opens, report playback, read stats and events, shut down.
 *
 *   cc client-lib/examples/player.c -Iclient-lib/include -L"$CARGO_TARGET_DIR/release" -lfog_client -o player
 *   LD_LIBRARY_PATH="$CARGO_TARGET_DIR/release" ./player http://TRACKER:7700 http://ORIGIN/video/index.m3u8
 *
 * It prints the proxied URL, waits for a line on stdin (the "player" plays meanwhile), then prints the
 * proxy's stats as JSON and the number of events it saw.
 */
#include <stdio.h>
#include <string.h>

#include "fog.h"

static int fail(const char *what) {
    const char *why = fog_last_error();
    fprintf(stderr, "%s: %s\n", what, why ? why : "(no reason)");
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s TRACKER_URL ORIGIN_URL\n", argv[0]);
        return 2;
    }
    char config[2048];
    snprintf(config, sizeof config, "{\"tracker\": \"%s\", \"listen\": \"127.0.0.1:0\"}", argv[1]);
    FogHandle *fog = fog_client_new(config);
    if (!fog) return fail("fog_client_new");

    /* Bad input is an error with a reason, never a crash. */
    if (fog_client_new("{not json") != NULL || fog_last_error() == NULL) {
        fprintf(stderr, "a malformed config was accepted\n");
        return 1;
    }

    char *url = fog_proxy_url(fog, argv[2]);
    if (!url) return fail("fog_proxy_url");
    printf("%s\n", url);
    fflush(stdout);
    fog_string_free(url);

    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;

    if (fog_report_playback(fog, 12.5, 8.0, 1) != 0) return fail("fog_report_playback");
    if (fog_report_playback(fog, 1.0, 1.0, 42) != -1) {
        fprintf(stderr, "an unknown playback state was accepted\n");
        return 1;
    }
    char *stats = fog_stats_json(fog);
    if (!stats) return fail("fog_stats_json");
    printf("%s\n", stats);
    fog_string_free(stats);

    int events = 0;
    char *event;
    while ((event = fog_poll_event(fog)) != NULL) {
        events++;
        fog_string_free(event);
    }
    printf("events=%d\n", events);
    fflush(stdout);
    fog_client_free(fog);
    return 0;
}
