module freezeproxy.local/bench/goproxy

go 1.19
