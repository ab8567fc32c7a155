// The test bed's cluster DNS: CoreDNS built with only the plugins our Corefile uses
// (testbed/cluster.py). Knative needs <svc>.<ns>.svc.cluster.local names; nothing else.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() { coremain.Run() }
