// Baseline for the benchmarks: the reverse proxy the original freeze-proxy used, Go's
// net/http/httputil with a 25 ms flush interval, without any freezing. Stdlib only.
package main

import (
	"flag"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:9999", "address to listen on")
	upstream := flag.String("upstream", "http://127.0.0.1:8080", "the app's URL")
	flag.Parse()
	target, err := url.Parse(*upstream)
	if err != nil {
		log.Fatalf("bad -upstream: %v", err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.FlushInterval = 25 * time.Millisecond
	proxy.Transport = &http.Transport{MaxIdleConnsPerHost: 1024, IdleConnTimeout: 30 * time.Second}
	log.Fatal(http.ListenAndServe(*listen, proxy))
}
