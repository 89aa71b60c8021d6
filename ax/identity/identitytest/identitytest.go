// Package identitytest makes throwaway AX identities for tests: a CA in a
// temporary directory and a certificate for each name asked for.
package identitytest

import (
	"strings"
	"testing"
	"time"

	"github.com/axproject/ax/ax/identity"
)

// PKI makes a CA in a temporary directory and an identity for each name:
// names starting with "w" are witnesses, the others hosts.
func PKI(t testing.TB, names ...string) (dir string, ids map[string]*identity.Identity) {
	t.Helper()
	roles := map[string]identity.Role{}
	for _, n := range names {
		roles[n] = identity.RoleHost
		if strings.HasPrefix(n, "w") {
			roles[n] = identity.RoleWitness
		}
	}
	return PKIRoles(t, roles)
}

// PKIRoles is PKI with each name's role given.
func PKIRoles(t testing.TB, roles map[string]identity.Role) (dir string, ids map[string]*identity.Identity) {
	t.Helper()
	dir = t.TempDir()
	if err := identity.NewCA(dir, "test-ca", time.Hour); err != nil {
		t.Fatal(err)
	}
	ids = map[string]*identity.Identity{}
	for n, role := range roles {
		if err := identity.Issue(dir, dir, n, role, time.Hour); err != nil {
			t.Fatal(err)
		}
		id, err := identity.Load(identity.Files{CA: identity.CAPath(dir), Cert: identity.CertPath(dir, n), Key: identity.KeyPath(dir, n)})
		if err != nil {
			t.Fatal(err)
		}
		ids[n] = id
	}
	return dir, ids
}
