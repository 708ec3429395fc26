/*
 * The cutover protocol of Switchyard (DESIGN.md "Cutover (the fence)"), as it must be after
 * issue 14's fixes, for one tenant migrating from store S (source) to store T (target).
 * Checked exhaustively by spin: scripts/check-model.sh; what is modeled and what is abstracted
 * away: docs/model/README.md; which code each process and step stands for:
 * docs/architecture.md, "The model".
 *
 * Processes: the cutover driver (Control, which may crash at every step and is then restarted
 * as `serve`'s recoverer), a second `serve` replica's recoverer whose "abandoned" check may fire
 * early (Recoverer), an operator's emergency stop (Stop) and abort (Abort), writers behind two
 * proxies (Writer): proxy 0 hears routing changes late (Notify), proxy 1 never hears them and
 * reloads only when an append meets a moved fence or a writer waits at its gate; PostgreSQL
 * settling a transaction whose COMMIT was sent on a connection that died (Pg).
 *
 * Invariants (DESIGN.md), asserted in every reachable state (Invariants) or where they apply:
 *   1  the source is authoritative until its fence moves: every append is acknowledged by the
 *      authoritative store, and routing never sends writes onto a moved fence;
 *   2  every acknowledged append is in the authoritative store (nothing lost);
 *   4  no append reaches a store whose fence moved;
 *   5  the cutover is all or nothing, and no writer is blocked forever: every execution ends,
 *      and it ends with every writer acknowledged, every gate open (checked in init, and by
 *      spin's end-state check: a writer stuck at a gate is an invalid end state);
 *   8  the target admits writers only once the source's fence moved (issue 19: until then its
 *      fence admits copiers only), so the two stores are never both open to writers.
 *
 * Mutants (each must make spin report a violation; see scripts/check-model.sh):
 *   OLD_EMERGENCY_STOP            the emergency stop of 0645b7a (issue 14 item 1): both of
 *   OLD_STOP_STALE_SOURCE           its `source` survives from an earlier loop iteration, so a
 *                                   tenant whose cutover just finished is routed back;
 *   OLD_STOP_SKIPPED_REOPEN         it fails a migration without the fence, and its reopen
 *                                   skips a fence a cutover holds (still open) without waiting
 *   AMBIGUOUS_COMMIT_AS_ROLLBACK  a failed or timed-out fence COMMIT rolls routing back (item 5)
 *   REREAD_WITHOUT_LOCK           the ambiguous commit is resolved by a plain read of the fence,
 *                                 which may run before PostgreSQL settles the transaction
 *   RECOVER_WITHOUT_LOCK          the recoverer decides without holding the fence
 *   APPEND_WITHOUT_FENCE_LOCK     an append reads the fence without FOR SHARE
 *   GATE_WITHOUT_RECHECK          writers wait at a gate without the proxy re-reading routing
 *   STOP_REOPENS                  the emergency stop before issue 17: it fails a migration in
 *                                 cutover by a compare-and-set without the fence, then reopens a
 *                                 fence the cutover moved meanwhile (safe only while no append
 *                                 is acknowledged on the target before routing names it: the
 *                                 follow step below breaks that; run with NO_INV1)
 *   FOLLOW_HELD_FENCE             a writer follows a fence whose move has not committed (the
 *                                 cutover holds it), e.g. a proxy that takes a fence wait for a
 *                                 move
 *   OPEN_TARGET_FIRST             the undo patch's order (issue 19): the cutover opens the
 *                                 target's fence just before it moves the source's, and a
 *                                 rollback closes it again
 *
 * NO_FOLLOW leaves out the writers' follow step (issue 17: an append that meets the source's
 * fence moved to its route's target goes there at once), to show what it changes.
 *
 * REVERT (issue 19, the reverse direction): once M's cutover committed and finished, reverse
 * replication (S's fence `copiers`, routing normal on T with target S), then `revert` (Revert:
 * R, a migration from T back to S whose cutover is Control's steps with the roles swapped) and,
 * with COMPLETE, `complete` racing it; writers in SECOND_APPENDS append again once M's cutover is
 * over, and follow T's moved fence back to S. The invariants hold across both directions: the
 * authoritative store is S again exactly when T's fence moves (AUTH). Options: STALE_FORWARD (M's
 * driver and recoverer may act late, during R; R does not crash), COPIERS (the reverse mirror and
 * tail), R_RECOVERER (a second serve replica recovering R; not in the script: state space).
 * Mutants under REVERT:
 *   REVERT_OPENS_SOURCE_FIRST     R opens S to writers before T's move commits
 *   REVERSE_ADMITS_WRITERS        S's `copiers` fence admits a stale proxy's append
 *   REVERT_WITHOUT_DELTA          R moves T's fence without the final delta, trusting the
 *                                 reverse mirror and tail (run with COPIERS)
 *   OPEN_TARGET_UNCONDITIONALLY   open_target sets T's fence open whatever row it finds (the code
 *                                 on main at c667e33): a late M driver or recoverer reopens T after R
 *                                 moved it (run with STALE_FORWARD)
 */

#ifndef WRITERS
#define WRITERS 3
#endif

#define S 0
#define T 1

/* Holders of a store's fence row lock (FOR UPDATE). */
#define NOBODY    0
#define CUTTER    1   /* the cutover driver's source transaction (FenceLock) */
#define STOPPER   2   /* the emergency stop */
#define RECOVERER 3   /* a serve replica's recover_cutover */
#define RESTARTED 4   /* the restarted control process's recover_cutover */
#define ORPHAN    5   /* a transaction whose COMMIT was sent on a connection that then died */

#define MAX_REROUTES 3   /* proxy/src/api.rs MAX_REROUTES */

mtype = { NORMAL, DUAL_WRITE, CUTOVER_PAUSED };                          /* tenant_routing */
mtype = { M_DUAL_WRITE, M_CUTOVER, M_MIGRATED, M_FAILED, M_ROLLED_BACK }; /* tenant_migrations */

/* The stores: the tenant's fence row in each (open or moved) and who holds it FOR UPDATE, and
 * which writers' events each holds (bit w = writer w's event; an append is idempotent by
 * event_id, so an event is in a store or not). */
bit  moved[2];
byte locker[2];
byte has[2];
/* The target's fence admits writers (`open`); 0: copiers only (`copiers`, naming S), as from
 * the migration's start until the cutover opens it. The copiers themselves (the final delta's
 * copy) are not writers. */
bit  topen;

/* The control database: the tenant's routing row and its migration. */
mtype rstate = DUAL_WRITE;
bit   rstore = S;
byte  repoch = 1;
mtype mstate = M_DUAL_WRITE;

/* Each proxy's routing table entry for the tenant (its ArcSwap snapshot), and the move it
 * noted beside the table when an append met the source's moved fence (Routes::note_moved: the
 * route's epoch then; 0 = none), which the tenant's appends and reads follow while the table's
 * route is still the stale one (Moved::contradicts). */
mtype pstate[2];
bit   pstore[2];
byte  pepoch[2];
byte  pmoved[2];

/* Writers whose append was acknowledged (bit w). */
byte acked;

bit crashed;   /* the cutover driver crashed (at most once) */

#ifdef REVERT
/* Issue 19's undo (the reverse direction): after the forward cutover M (S → T) has committed
 * with reverse replication, S's fence is `copiers` naming T (moved[S], scop) and T's is open;
 * routing is normal on T with S as its target. `revert` is a migration of its own, R (T → S),
 * whose cutover is Engine::cutover with the roles swapped (Revert); `complete` ends the reverse
 * replication (Complete). T's fence row is `topen` alone (open, or `copiers` naming S: before
 * M's cutover opened it, and again once R's move committed): one row, so whoever opens it late
 * opens the row R moved. moved[T] records that R's move committed (T's fence went to `copiers`
 * by a move: the authoritative store is S again); it is the row's version, which a fence
 * compare-and-set can see (the epoch R's move wrote). */
mtype = { R_NONE, R_DUAL_WRITE, R_CUTOVER, R_MIGRATED, R_ROLLED_BACK };  /* R's migration */
mtype rmst = R_NONE;
bit   mfinished;  /* M's finished_at: complete ran (revert is refused from then on) */
bit   rtgt;       /* the routing row's target (the other store): the mirror, the first follow hop */
bit   ptgt[2];    /* each proxy's snapshot of it */
bit   pmfrom[2];  /* the store a noted move left (Moved::from) */
bit   scop = 1;   /* S's fence, once moved: `copiers` (1) or `moved` (0, after complete) */
/* Without STALE_FORWARD, R starts only once M's driver and recoverer are done (ghosts): the
 * state space. With it, they may still act, late, while R runs (a slow driver, a recoverer
 * that read M before it migrated), and R's driver does not crash (R_CRASHES off). */
bit   ctl_done;   /* M's driver (Control) ended */
bit   rec_busy;   /* M's second recoverer passed its check and has not ended */
#if !defined(STALE_FORWARD) && !defined(NO_R_CRASHES)
#define R_CRASHES
#endif
#define RCUTTER    6   /* R's cutover driver's transaction on T's fence */
#define RRECOVERER 7   /* a serve replica's recover_cutover for R */
#define RRESTARTED 8   /* R's restarted driver (revert run again) */
#endif

/* The store whose fence says it holds the tenant's history: the source until its fence moves. */
#ifdef REVERT
/* S until its fence moves, then T until R moves T's fence, then S again. */
#define AUTH (moved[T] -> S : (moved[S] -> T : S))
/* A store's fence admits writers (appends, proxies, direct writers). */
#define WRITABLE(s) (s == S -> !moved[S] : topen)
#else
#define AUTH (moved[S] -> T : S)
#endif
#define ALL_ACKED_IN(s) ((acked & has[s]) == acked)
#define DELTA_COPIED ((has[S] & has[T]) == has[S])
/* S holds every event T holds: R's move needs it. */
#define REVERSE_DELTA_COPIED ((has[S] & has[T]) == has[T])
/* Invariant 8: never both stores open to writers. */
#ifdef NO_INV8
/* Only to let a mutant that reopens the source run past INV8 to the violation it stands for. */
#define INV8 true
#else
#define INV8 (!topen || moved[S])
#endif
#ifdef NO_INV1
/* Only to let a mutant run past its first violation of INV1 to a later one. */
#define INV1 true
#else
#ifdef REVERT
#define INV1 (rstate == CUTOVER_PAUSED || WRITABLE(rstore))
#else
#define INV1 (rstate == CUTOVER_PAUSED || !moved[rstore])
#endif
#endif
#define INV2 ALL_ACKED_IN(AUTH)

#ifdef REVERT
/* The route's target: a migrating route's, or reverse replication's (normal on T keeping S
 * current; normal on S keeping T current after R). */
inline set_route_to(st, sto, tg) {
    rstate = st; rstore = sto; rtgt = tg; repoch++;
    printf("MSC: %d: migration %e, revert %e, routing %e on store %d, target %d (epoch %d)\n", _pid, mstate, rmst, rstate, rstore, rtgt, repoch)
}
/* M's routes: dual_write and cutover_paused on S name T; normal on T keeps S current. */
#define set_route(st, sto) set_route_to(st, sto, (st != NORMAL || sto == T))
#else
inline set_route(st, sto) {
    rstate = st; rstore = sto; repoch++;
    printf("MSC: %d: migration %e, routing %e on store %d (epoch %d)\n", _pid, mstate, rstate, rstore, repoch)
}
#endif

/* Moved::contradicts: the proxy's route is still the stale one a noted move of S → T
 * contradicts (it names S, and routing has not changed since, or only to the same move's
 * cutover_paused). */
#ifdef REVERT
#define STALE(p, st, sto, ep) (pmoved[p] != 0 && sto == pmfrom[p] && (ep <= pmoved[p] || st == CUTOVER_PAUSED))
#else
#define STALE(p, st, sto, ep) (pmoved[p] != 0 && sto == S && (ep <= pmoved[p] || st == CUTOVER_PAUSED))
#endif

/* watcher::reload: the proxy's table becomes what the control database says now; a noted move
 * the new route no longer contradicts is forgotten (Routes::store). */
inline reload(p) {
    atomic {
        pstate[p] = rstate; pstore[p] = rstore; pepoch[p] = repoch;
#ifdef REVERT
        ptgt[p] = rtgt;
#endif
        if
        :: !STALE(p, pstate[p], pstore[p], pepoch[p]) -> pmoved[p] = 0
        :: else -> skip
        fi
    }
}

/* lock_fence: SELECT ... FOR UPDATE on the fence row waits for the holder to finish (appends'
 * FOR SHARE is taken and released inside their one atomic step, see Writer). */
inline take_fence(s, me) {
    atomic { locker[s] == NOBODY -> locker[s] = me }
}

inline release_fence(s, me) {
    assert(locker[s] == me); locker[s] = NOBODY
}

#ifdef REVERT
/* Engine::open_target (an UPDATE of T's fence row: it waits for a FOR UPDATE holder). The
 * code's open_fence sets the row open whatever it is (OPEN_TARGET_UNCONDITIONALLY); the fixed
 * protocol opens only the `copiers` row M's start wrote, never the one R's move wrote (a
 * compare-and-set on the row's epoch): a forward driver or recoverer that acts late leaves it. */
#ifdef OPEN_TARGET_UNCONDITIONALLY
#define OPEN_TARGET atomic { locker[T] == NOBODY -> topen = 1 }
#else
#define OPEN_TARGET atomic { locker[T] == NOBODY -> if :: !moved[T] -> topen = 1 :: else -> skip fi }
#endif
#endif

/* recover_cutover: under the fence (or without it: a serve replica may time out on the lock and
 * leave), the fence is the truth: moved → migrated on the target; open → back to dual_write. */
inline recover(me, may_give_up) {
    if
    :: mstate != M_CUTOVER -> skip
    :: else ->
#ifdef RECOVER_WITHOUT_LOCK
        atomic {
            if
            :: mstate == M_CUTOVER && moved[S] -> topen = 1; mstate = M_MIGRATED; set_route(NORMAL, T)
            :: mstate == M_CUTOVER && !moved[S] -> mstate = M_DUAL_WRITE; set_route(DUAL_WRITE, S)
            :: else -> skip
            fi
        }
#elif defined(REVERT)
        /* Engine::settle_under_fence: under the lock, a moved fence → open the target
         * (open_target), then the compare-and-set from cutover, which a migration that moved on
         * meanwhile (its record was read before the lock) fails. */
        if
        :: take_fence(S, me);
            if
            :: moved[S] ->
                if
                :: OPEN_TARGET
                /* open_target times out while R's cutover or recoverer holds T's fence (which
                 * may wait for S's, held here): M moved on, and the transition below fails. */
                :: locker[T] != NOBODY -> assert(mstate != M_CUTOVER)
                fi
            :: else -> skip
            fi;
            atomic {
                if
                :: mstate == M_CUTOVER && moved[S] -> mstate = M_MIGRATED; set_route(NORMAL, T)
                :: mstate == M_CUTOVER && !moved[S] -> mstate = M_DUAL_WRITE; set_route(DUAL_WRITE, S)
                :: else -> skip
                fi;
                release_fence(S, me)
            }
        :: may_give_up -> skip
        fi
#else
        if
        :: take_fence(S, me);
            atomic {
                if
                :: mstate == M_CUTOVER && moved[S] -> topen = 1; mstate = M_MIGRATED; set_route(NORMAL, T)
                :: mstate == M_CUTOVER && !moved[S] -> mstate = M_DUAL_WRITE; set_route(DUAL_WRITE, S)
                :: else -> skip
                fi;
                release_fence(S, me)
            }
        :: may_give_up -> skip   /* lock_fence timed out: someone holds it, not abandoned */
        fi
#endif
    fi
}

/* A crash point of the cutover driver (SWITCHYARD_CRASH_AT in cutover.rs): at most one crash. */
#if defined(REVERT) && !defined(FORWARD_CRASHES)
/* Under REVERT, M's driver does not crash (its crash points are checked by the runs without
 * REVERT; the Recoverer still acts at any moment, so a stale recoverer and a slow driver
 * meet the revert): R's driver may, once. */
#define CRASH_POINT skip
#else
#define CRASH_POINT if :: !crashed -> crashed = 1; goto crash :: true -> skip fi
#endif

proctype Control() {
    bit fenced = 0;
    /* 1 (refuse unless dual_write; the lag gate, the check below the delta and the last tail
     * pass are abstracted), then 2 and 3 at once: close the gates — migration cutover, routing
     * cutover_paused, in one transition; each proxy told directly is one more reload at some
     * moment, as Notify's — and take the source fence within the budget, in either order. */
    if
    :: take_fence(S, CUTTER); fenced = 1            /* the fence first */
    :: skip                                         /* the transition first */
    fi;
    atomic {
        if
        :: mstate == M_DUAL_WRITE -> mstate = M_CUTOVER; set_route(CUTOVER_PAUSED, S)
        :: else ->                                  /* refused */
            if
            :: fenced -> release_fence(S, CUTTER)
            :: else -> skip
            fi;
            goto over
        fi
    }
    CRASH_POINT;                                    /* after_gate_closed */
    /* 3: the fence within the budget, if not taken yet; then re-check the migration under it. */
    if
    :: fenced -> skip
    :: !fenced -> take_fence(S, CUTTER)
    :: !fenced -> goto rollback                     /* lock_timeout: the budget ran out */
    fi;
    if
    :: mstate != M_CUTOVER -> release_fence(S, CUTTER); goto rollback
    :: else -> skip
    fi;
    CRASH_POINT;                                    /* after_fence_taken */
    /* 4: copy the final delta and verify it (or fail: verification, the budget). */
    if
    :: has[T] = has[T] | has[S]
    :: true -> release_fence(S, CUTTER); goto rollback
    fi;
    CRASH_POINT;                                    /* after_delta_verified */
#ifdef OPEN_TARGET_FIRST
    topen = 1;
#endif
    /* 4: move the fence and commit. */
    if
    :: atomic { moved[S] = 1; assert(DELTA_COPIED); release_fence(S, CUTTER); printf("MSC: fence moved\n") }; goto forward
    :: locker[S] = ORPHAN; goto ambiguous          /* COMMIT failed or timed out: did it apply? */
#if !defined(REVERT) || defined(FORWARD_CRASHES)
    :: !crashed -> atomic { crashed = 1; locker[S] = ORPHAN }; goto crash   /* died after COMMIT */
#endif
    fi;
ambiguous:
#if defined(AMBIGUOUS_COMMIT_AS_ROLLBACK)
    goto rollback;
#elif defined(REREAD_WITHOUT_LOCK)
    if
    :: moved[S] -> goto forward
    :: else -> goto rollback
    fi;
#else
    /* Re-read the fence on a fresh connection, under the lock: that waits until PostgreSQL has
     * settled the old transaction, and then the fence says which way to go. */
    take_fence(S, CUTTER);
    if
    :: atomic { moved[S] -> release_fence(S, CUTTER) }; goto forward
    :: atomic { !moved[S] -> release_fence(S, CUTTER) }; goto rollback
    fi;
#endif
forward:
    CRASH_POINT;                                    /* after_source_moved */
    /* 5: the target opens to writers, only now that the source's fence moved. */
#ifdef REVERT
    OPEN_TARGET;
#else
    topen = 1;
#endif
    CRASH_POINT;                                    /* after_fence */
    /* 5: routing normal on the target; gates open onto it. Someone may have finished it. */
    atomic {
        if
        :: mstate == M_CUTOVER -> topen = 1; mstate = M_MIGRATED; set_route(NORMAL, T)
        :: else -> skip     /* finished by a recoverer or the stop (else: an error, see init) */
        fi
    }
    goto over;
rollback:
    CRASH_POINT;                                    /* before_rollback */
    /* Routing back to dual_write on the source, unless someone moved the migration on. */
    atomic {
        if
        :: mstate == M_CUTOVER -> mstate = M_DUAL_WRITE; set_route(DUAL_WRITE, S)
        :: else -> skip
        fi;
#ifdef OPEN_TARGET_FIRST
        topen = 0;
#endif
    }
    goto over;
crash:
    /* The process died: PostgreSQL rolls back a transaction it still held (not one whose
     * COMMIT was sent: Pg settles that one). Restarted, control finishes the cutover. */
    atomic {
        if
        :: locker[S] == CUTTER -> locker[S] = NOBODY
        :: else -> skip
        fi
    }
    recover(RESTARTED, false);
over:
#ifdef REVERT
    ctl_done = 1
#else
    skip
#endif
}

/* Another serve replica: its "abandoned" check (age past budget + margin) may pass while the
 * driver is only slow, so it may act at any moment of a cutover, or time out on the lock. */
proctype Recoverer() {
end:
#ifdef REVERT
    if
    :: atomic { mstate == M_CUTOVER -> rec_busy = 1 }; recover(RECOVERER, true); rec_busy = 0
    fi
#else
    if
    :: mstate == M_CUTOVER -> recover(RECOVERER, true)
    fi
#endif
}

/* switchyard-control emergency-stop for the tenant, at any moment (or never). */
#ifdef OLD_EMERGENCY_STOP
#define OLD_STOP_STALE_SOURCE
#define OLD_STOP_SKIPPED_REOPEN
#endif

proctype Stop() {
#if defined(OLD_STOP_STALE_SOURCE) || defined(OLD_STOP_SKIPPED_REOPEN) || defined(STOP_REOPENS)
    /* ops.rs stop_tenant / reopen_after_stop at 0645b7a (with one of its two defects, or both),
     * or as it was until issue 17 (STOP_REOPENS: neither defect, the reopen waits for the lock).
     * The migration is failed by a compare-and-set on the state it read, without the fence. */
    bit have_source = 0;
    mtype seen;
    byte tries = 0;
    bit store;
    bit change;
    do
    :: tries < 3 ->
        atomic {
            if
            :: mstate == M_DUAL_WRITE || mstate == M_CUTOVER -> seen = mstate; have_source = 1
#ifdef OLD_STOP_STALE_SOURCE
            :: else -> break    /* no active migration (any more): `source` is kept */
#else
            :: else -> have_source = 0; break
#endif
            fi
        }
        atomic {
            if
            :: mstate == seen -> mstate = M_FAILED; set_route(NORMAL, S); break
            :: else -> tries++  /* StateChanged: read again */
            fi
        }
    :: else -> break
    od;
    atomic { store = (have_source -> S : rstore); change = (rstate != NORMAL || rstore != store) }
    if
    :: change -> atomic { set_route(NORMAL, store) }
    :: else -> skip
    fi;
#ifdef OLD_STOP_SKIPPED_REOPEN
    /* reopen_fence: UPDATE ... WHERE state = 'moved' waits only for the lock of a row whose
     * committed state matches; a row a cutover holds, still open, is skipped at once. */
    atomic {
        if
        :: !moved[store] -> skip
        :: moved[store] && locker[store] == NOBODY -> moved[store] = 0; printf("MSC: stop reopened the fence of store %d\n", store)
        fi
    }
#else
    /* A reopen that waits for whoever holds the fence, then reopens it if it moved. */
    atomic {
        locker[store] == NOBODY ->
            if
            :: moved[store] -> moved[store] = 0; printf("MSC: stop reopened the fence of store %d\n", store)
            :: else -> skip
            fi
    }
#endif
#else
    /* ops.rs stop_tenant: a migration in dual_write is failed by a compare-and-set (a cutover
     * closing the gates first makes it fail: read again); one in cutover is decided under the
     * source fence (stop_cutover), which waits for (or wins against) a cutover holding it: a
     * fence moved to T means the cutover committed, so the stop finishes it forward (migrated,
     * routing normal on T); an open fence, and the migration is failed while the fence is held,
     * so no cutover can move it after (it re-checks the state under the fence). */
    byte tries = 0;
    bit store;
    do
    :: tries >= 3 -> break
    :: atomic { tries < 3 && mstate == M_DUAL_WRITE -> mstate = M_FAILED; set_route(NORMAL, S) }; break
    :: atomic { tries < 3 && mstate != M_DUAL_WRITE && mstate != M_CUTOVER }; break   /* nothing active */
    :: tries < 3 && mstate == M_CUTOVER ->
        take_fence(S, STOPPER);
        atomic {
            if
            :: mstate == M_CUTOVER && moved[S] -> topen = 1; mstate = M_MIGRATED; set_route(NORMAL, T)
            :: mstate == M_CUTOVER && !moved[S] -> mstate = M_FAILED; set_route(NORMAL, S)
            :: else -> skip     /* StateChanged: read again */
            fi;
            release_fence(S, STOPPER);
            tries++
        }
    od;
    /* reopen_after_stop: a moved fence in the store routing names is opened again, under its
     * lock (here never moved: the stop fails a migration only with the fence open and held). */
    atomic { store = rstore };
    atomic {
        locker[store] == NOBODY ->
            if
            :: rstore == store && moved[store] -> moved[store] = 0; printf("MSC: stop reopened the fence of store %d\n", store)
            :: else -> skip
            fi
    }
#endif
}

/* switchyard-control abort, at any moment (or never): waits while the migration is in cutover,
 * then rolls back a migration that is not terminal, or is refused. */
proctype Abort() {
end:
    (mstate != M_CUTOVER);
    atomic {
        if
        :: mstate == M_DUAL_WRITE -> mstate = M_ROLLED_BACK; set_route(NORMAL, S)
        :: else -> skip     /* migrated (refused) or already ended */
        fi
    }
}

/* Proxy 0 hears routing changes (NOTIFY, the epoch poll), late: at any later moment. */
proctype Notify() {
end:
    do
    :: pepoch[0] != repoch -> reload(0)
    od
}

/* PostgreSQL settles a transaction whose COMMIT was sent on a connection that died: it either
 * committed (the fence moved) or not; either way its lock goes. */
proctype Pg() {
end:
    do
    :: atomic {
        locker[S] == ORPHAN ->
            if
            :: moved[S] = 1; assert(DELTA_COPIED); printf("MSC: the orphaned COMMIT applied: fence moved\n")
            :: printf("MSC: the orphaned COMMIT did not apply\n")
            fi;
            locker[S] = NOBODY
        }
#ifdef REVERT
    :: atomic {
        locker[T] == ORPHAN ->
            if
            :: topen = 0; moved[T] = 1; assert(REVERSE_DELTA_COPIED); printf("MSC: R's orphaned COMMIT applied: T's fence moved\n")
            :: printf("MSC: R's orphaned COMMIT did not apply\n")
            fi;
            locker[T] = NOBODY
        }
#endif
    od
}

#ifdef REVERT
/* recover_cutover for R (its source is T, its target S): the same code, the roles swapped. */
inline rrecover(me, may_give_up) {
    if
    :: rmst != R_CUTOVER -> skip
    :: else ->
        if
        :: take_fence(T, me);
            if
            :: moved[T] -> atomic { locker[S] == NOBODY -> moved[S] = 0 }   /* open_target: S */
            :: else -> skip
            fi;
            atomic {
                if
                :: rmst == R_CUTOVER && moved[T] -> rmst = R_MIGRATED; set_route_to(NORMAL, S, 1)
                :: rmst == R_CUTOVER && !moved[T] -> rmst = R_DUAL_WRITE; set_route_to(DUAL_WRITE, T, 1)
                :: else -> skip
                fi;
                release_fence(T, me)
            }
        :: may_give_up -> skip
        fi
    fi
}

/* R's crash points: at most one crash per run, M's driver's or R's (the state space). */
#ifdef R_CRASHES
#define RCRASH_POINT if :: !crashed -> crashed = 1; goto crash :: true -> skip fi
#else
#define RCRASH_POINT skip
#endif

/* switchyard-control revert M (control/src/engine/revert.rs): refused unless M migrated, not
 * completed, and routing still M's reverse replication; then R, a migration of its own from T
 * back to S, whose copy and tail are abstracted (routing bulk_copy, then dual_write, on T with
 * target S: appends on T, mirrored to S by a copier; the lag gate may refuse), and whose cutover
 * is Engine::cutover with T as the source and S as the target: the steps of Control, with its
 * crash points, ambiguous commit and recovery. A failure before T's move commits rolls R back to
 * dual_write and aborts it: routing is M's reverse replication again (normal on T, target S). */
proctype Revert() {
    bit fenced = 0;
end:
#ifdef STALE_FORWARD
    (mstate == M_MIGRATED);
#else
    (mstate == M_MIGRATED && ctl_done && !rec_busy);
#endif
    atomic {
        if
        :: !mfinished && rmst == R_NONE && rstate == NORMAL && rstore == T && rtgt ->
            rmst = R_DUAL_WRITE; set_route_to(DUAL_WRITE, T, 1)
        :: else -> goto over                        /* refused (complete ran) */
        fi
    }
    /* The lag gate refuses: R is rolled back before any gate closed. */
    if
    :: goto aborted
    :: skip
    fi;
    /* Steps 2 and 3 at once, on T's fence. */
    if
    :: take_fence(T, RCUTTER); fenced = 1
    :: skip
    fi;
    atomic {
        if
        :: rmst == R_DUAL_WRITE -> rmst = R_CUTOVER; set_route_to(CUTOVER_PAUSED, T, 1)
        :: else ->
            if
            :: fenced -> release_fence(T, RCUTTER)
            :: else -> skip
            fi;
            goto over
        fi
    }
    RCRASH_POINT;                                   /* after_gate_closed */
    if
    :: fenced -> skip
    :: !fenced -> take_fence(T, RCUTTER)
    :: !fenced -> goto rollback
    fi;
    if
    :: rmst != R_CUTOVER -> release_fence(T, RCUTTER); goto rollback
    :: else -> skip
    fi;
    RCRASH_POINT;                                   /* after_fence_taken */
    /* The final delta T → S (or fail). */
    if
    :: has[S] = has[S] | has[T]
#ifdef REVERT_WITHOUT_DELTA
    :: skip                                         /* trusting the reverse mirror and tail */
#endif
    :: true -> release_fence(T, RCUTTER); goto rollback
    fi;
    RCRASH_POINT;                                   /* after_delta_verified */
#ifdef REVERT_OPENS_SOURCE_FIRST
    atomic { locker[S] == NOBODY -> moved[S] = 0 };
#endif
    /* T's fence moves to `copiers`, naming S, and commits. */
    if
    :: atomic { topen = 0; moved[T] = 1; assert(REVERSE_DELTA_COPIED); release_fence(T, RCUTTER); printf("MSC: T's fence moved\n") }; goto forward
    :: locker[T] = ORPHAN; goto ambiguous
#ifdef R_CRASHES
    :: !crashed -> atomic { crashed = 1; locker[T] = ORPHAN }; goto crash
#endif
    fi;
ambiguous:
    take_fence(T, RCUTTER);
    if
    :: atomic { moved[T] -> release_fence(T, RCUTTER) }; goto forward
    :: atomic { !moved[T] -> release_fence(T, RCUTTER) }; goto rollback
    fi;
forward:
    RCRASH_POINT;                                   /* after_source_moved */
    atomic { locker[S] == NOBODY -> moved[S] = 0 }  /* open_target: S opens to writers */
    RCRASH_POINT;                                   /* after_fence */
    atomic {
        if
        :: rmst == R_CUTOVER -> rmst = R_MIGRATED; set_route_to(NORMAL, S, 1)
        :: else -> skip
        fi
    }
    goto over;                                      /* M finished (reverted_by R): not modeled */
rollback:
    RCRASH_POINT;                                   /* before_rollback */
    atomic {
        if
        :: rmst == R_CUTOVER -> rmst = R_DUAL_WRITE; set_route_to(DUAL_WRITE, T, 1)
        :: else -> skip
        fi
    }
aborted:
    /* R aborted: its route is M's reverse replication again (implied_route of a revert). */
    atomic {
        if
        :: rmst == R_DUAL_WRITE -> rmst = R_ROLLED_BACK; set_route_to(NORMAL, T, 1)
        :: else -> skip
        fi
    }
    goto over;
crash:
    atomic {
        if
        :: locker[T] == RCUTTER -> locker[T] = NOBODY
        :: else -> skip
        fi
    }
    /* revert M run again settles R's cutover from T's fence (then would try the cutover again:
     * one attempt here, so R may end in dual_write). */
    rrecover(RRESTARTED, false);
over:
    skip
}

/* Another serve replica's recoverer for R. */
proctype RRecoverer() {
end:
    if
    :: rmst == R_CUTOVER -> rrecover(RRECOVERER, true)
    fi
}

/* switchyard-control complete M: refused while R is active or done; otherwise M finished,
 * routing loses its target, then S's fence goes `copiers` → `moved` (the copiers stop). */
proctype Complete() {
end:
    (mstate == M_MIGRATED);
    atomic {
        if
        :: !mfinished && (rmst == R_NONE || rmst == R_ROLLED_BACK) && rstate == NORMAL && rstore == T ->
            mfinished = 1; set_route_to(NORMAL, T, 0)
        :: else -> goto over                        /* refused */
        fi
    }
    atomic { locker[S] == NOBODY -> scop = 0 };
over:
    skip
}

/* Reverse replication's copiers (the proxies' reverse mirror, the reverse tail): T's events into
 * S while S's fence admits copiers. Events are copied whole (identity, versions and order are
 * not modeled, nor the copier's fence-version check: copying only adds what T holds). */
proctype Copier() {
end:
    do
    :: atomic { locker[S] == NOBODY && moved[S] && scop && (has[T] & ~has[S]) != 0 -> has[S] = has[S] | has[T] }
    od
}
#endif

/* The gate's recheck (gate.rs RECHECK): while writers wait, the proxy re-reads routing. */
#ifdef GATE_WITHOUT_RECHECK
#define GATE_RECHECK(p) false -> skip
#else
#define GATE_RECHECK(p) pepoch[p] != repoch -> reload(p)
#endif

/* One append of writer w's event through proxy p (api.rs append), retried by its client until
 * acknowledged: takes one snapshot of the route, waits at a closed gate, appends in one
 * transaction that takes FOR SHARE on the fence row and refuses when it moved. A source fence
 * moved to the route's migration target (T: the route is dual_write or cutover_paused) sends
 * the append there at once (the follow step), and the proxy notes the move, which its later
 * appends follow straight away, past the gate of a stale cutover_paused route; any other moved
 * fence reloads routing and waits for a newer open route. */
#ifdef REVERT
/* Under REVERT the writers in SECOND_APPENDS (a bit per writer) append a second event,
 * w + WRITERS, once M's cutover is over, and the route's target (tg) decides the first follow hop:
 * a fence moved to the route's own target (`next == route.target`). */
#define EVBIT (1 << ev)
/* The second append waits until M's cutover is over (migrated, or rolled back to dual_write
 * after the gates closed: epoch past 1), to keep the state space small: the forward cutover is
 * checked with every writer appending at any moment by the runs without REVERT. */
#define FORWARD_OVER (mstate == M_MIGRATED || (mstate == M_DUAL_WRITE && repoch > 1))
#ifndef SECOND_APPENDS
#ifdef STALE_FORWARD
#define SECOND_APPENDS 0
#else
#define SECOND_APPENDS 2   /* writer 1, behind the deaf proxy */
#endif
#endif
#define SNAPSHOT(p) st = pstate[p]; sto = pstore[p]; ep = pepoch[p]; tg = ptgt[p]; fol = STALE(p, st, sto, ep)
#else
#define EVBIT (1 << w)
#define SNAPSHOT(p) st = pstate[p]; sto = pstore[p]; ep = pepoch[p]; fol = STALE(p, st, sto, ep)
#endif

proctype Writer(byte w; byte p) {
    mtype st;
    bit sto;
    byte ep;
    byte reroutes = 0;
    bit fol;    /* following a move: to T, never mirrored */
#ifdef REVERT
    bit tg;     /* the route has a target (the other store) */
    bit fs;     /* the store the append follows a moved fence to */
    byte ev = w;
#endif
    atomic { SNAPSHOT(p) }
again:
    if
    :: !fol && st == CUTOVER_PAUSED ->
        /* gate::wait(Until::Open); the gate's recheck reloads while writers wait. */
        do
        :: atomic { pstate[p] != CUTOVER_PAUSED -> SNAPSHOT(p); break }
        :: GATE_RECHECK(p)
        od
    :: else -> skip
    fi;
    if
#ifdef REVERT
    :: fol -> fs = !sto; goto follow
#else
    :: fol -> goto follow
#endif
    :: else -> skip
    fi;
#ifdef REVERT
    /* switchyard_append on the route's store: FOR SHARE waits for a FOR UPDATE holder; a fence
     * that admits copiers only (or nobody) refuses, naming the other store. */
#ifdef REVERSE_ADMITS_WRITERS
#define ADMITS(s) (WRITABLE(s) || (s == S && moved[S] && scop))
#else
#define ADMITS(s) WRITABLE(s)
#endif
    if
    :: atomic { locker[sto] == NOBODY && !ADMITS(sto) -> printf("MSC: writer %d (event %d) refused by the fence of store %d\n", w, ev, sto) }; goto fenced
    :: atomic {
        locker[sto] == NOBODY && ADMITS(sto) ->
            assert(sto == AUTH);                    /* invariant 1 */
            has[sto] = has[sto] | EVBIT; acked = acked | EVBIT;
            if
            :: pmoved[p] != 0 && pmfrom[p] == sto -> pmoved[p] = 0   /* forget_moved */
            :: else -> skip
            fi;
            printf("MSC: writer %d (event %d) acknowledged by store %d\n", w, ev, sto)
        }; goto done
    fi;
#elif defined(APPEND_WITHOUT_FENCE_LOCK)
    if
    :: moved[sto] -> goto fenced
    :: else -> skip
    fi;
    atomic {
        assert(!moved[sto]);                        /* invariant 4 */
        assert(sto == AUTH);                        /* invariant 1 */
        has[sto] = has[sto] | (1 << w); acked = acked | (1 << w)
    }
    goto done;
#else
    /* switchyard_append: FOR SHARE waits while someone holds the fence FOR UPDATE. */
    if
    :: atomic { locker[sto] == NOBODY && moved[sto] -> printf("MSC: writer %d refused by the moved fence of store %d\n", w, sto) }; goto fenced
    :: atomic {
        locker[sto] == NOBODY && !moved[sto] && (sto == S || topen) ->
            assert(sto == AUTH);                    /* invariant 1 */
            has[sto] = has[sto] | (1 << w); acked = acked | (1 << w);
            if
            :: sto == S && pstore[p] == S -> pmoved[p] = 0   /* forget_moved: S's fence is open */
            :: else -> skip
            fi;
            printf("MSC: writer %d acknowledged by store %d\n", w, sto)
        }; goto done
#ifdef FOLLOW_HELD_FENCE
    :: atomic { locker[sto] != NOBODY && sto == S && st != NORMAL -> printf("MSC: writer %d takes the held fence of store %d for a move\n", w, sto) }; goto follow
#endif
    fi;
#endif
fenced:
    reroutes++;
    assert(reroutes <= MAX_REROUTES);               /* else 503 writes_paused */
#if defined(REVERT)
    /* The fence names the other store (moved_to): the route's own target when it has one. */
    if
    :: tg ->
        atomic {
            if
            :: pstore[p] == sto && (pepoch[p] <= ep || pstate[p] == CUTOVER_PAUSED) -> pmoved[p] = ep; pmfrom[p] = sto   /* note_moved */
            :: else -> skip
            fi
        };
        fs = !sto;
        goto follow
    :: else -> skip
    fi;
#elif !defined(NO_FOLLOW)
    /* The fence names T (moved_to): the route's own target, a store this proxy has. */
    if
    :: sto == S && st != NORMAL ->
        atomic {
            if
            :: pstore[p] == S && (pepoch[p] <= ep || pstate[p] == CUTOVER_PAUSED) -> pmoved[p] = ep   /* note_moved */
            :: else -> skip
            fi
        };
        goto follow
    :: else -> skip
    fi;
#endif
    reload(p);
    /* gate::wait(Until::OpenAfter { epoch }): a route newer than the one the fence refused. */
    do
    :: atomic { pstate[p] != CUTOVER_PAUSED && pepoch[p] > ep -> SNAPSHOT(p); break }
    :: GATE_RECHECK(p)
    od;
    goto again;
follow:
#ifdef REVERT
    /* The append on fs, in its own fence transaction. Until a cutover opens fs (just after the
     * other's move), or once the tenant moved back, fs sends it back to the store it came from,
     * whose fence may send it to fs again: the proxy retries between the two with a backoff
     * (TargetOpening) until one of them takes it, which is waiting here until one is open. */
    if
    :: atomic {
        locker[fs] == NOBODY && WRITABLE(fs) ->
            assert(fs == AUTH);                     /* invariant 1 */
            has[fs] = has[fs] | EVBIT; acked = acked | EVBIT;
            printf("MSC: writer %d (event %d) acknowledged by store %d, following the moved fence\n", w, ev, fs)
        }
    :: atomic {
        locker[fs] == NOBODY && !WRITABLE(fs) && locker[!fs] == NOBODY && WRITABLE(!fs) ->
            assert(!fs == AUTH);                    /* invariant 1 */
            has[!fs] = has[!fs] | EVBIT; acked = acked | EVBIT;
            printf("MSC: writer %d (event %d) acknowledged by store %d, sent back by the fence of %d\n", w, ev, !fs, fs)
        }
    fi;
#else
    /* The append on T, in T's own fence transaction. Until the cutover opens T (just after the
     * move), T sends it back to S, whose fence sends it to T again: the proxy retries between
     * the two with a backoff, which is waiting here. */
    atomic {
        locker[T] == NOBODY && !moved[T] && topen ->
            assert(T == AUTH);                      /* invariant 1 */
            has[T] = has[T] | (1 << w); acked = acked | (1 << w);
            printf("MSC: writer %d acknowledged by store %d, following the moved fence\n", w, T)
    };
#endif
done:
#ifdef REVERT
    /* The writer's second event, with a fresh route snapshot. */
    if
    :: ev < WRITERS && (SECOND_APPENDS & (1 << w)) -> atomic { FORWARD_OVER -> ev = ev + WRITERS; reroutes = 0; SNAPSHOT(p) }; goto again
    :: else -> skip
    fi;
#endif
    skip
}

/* Checked in every reachable state: the guard holds only when an invariant is broken. */
proctype Invariants() {
end:
    do
    :: atomic { !(INV1 && INV2 && INV8) -> assert(INV1); assert(INV2); assert(INV8) }
    od
}

init {
    atomic {
        pstate[0] = DUAL_WRITE; pstore[0] = S; pepoch[0] = 1;
        pstate[1] = DUAL_WRITE; pstore[1] = S; pepoch[1] = 1;
        pmoved[0] = 0; pmoved[1] = 0;
#ifndef NO_MONITOR
        run Invariants();
#endif
        run Notify();
        run Pg();
        run Control();
        run Recoverer();
#ifdef REVERT
        run Revert();
#ifdef R_RECOVERER
        run RRecoverer();
#endif
#ifdef COPIERS
        run Copier();
#endif
#ifdef COMPLETE
        if
        :: run Complete()
        :: skip
        fi;
#endif
#elif defined(STOP_AND_ABORT)
        run Stop();
        run Abort();
#else
        if
        :: run Stop()
        :: run Abort()
        :: skip
        fi;
#endif
        run Writer(0, 0);
        run Writer(1, 1);
#if WRITERS > 2
        run Writer(2, 1);
#endif
    }
    /* Nothing else can move: every process ended or waits for good. */
    timeout;
#ifdef REVERT
    assert(acked == (((1 << WRITERS) - 1) | (SECOND_APPENDS << WRITERS)));   /* 5: every event acknowledged */
    assert(rstate != CUTOVER_PAUSED);               /* 5: every gate open */
    assert(WRITABLE(rstore));                       /* 1: routing names a writable store */
    assert(ALL_ACKED_IN(rstore));                   /* 2: nothing acknowledged is lost */
    assert(WRITABLE(S) != WRITABLE(T));             /* 8: exactly one store open to writers */
    /* 5: all or nothing, both ways: M rolled back; M migrated (R never ran, refused, rolled
     * back, or left in dual_write); or R migrated. */
    assert((!moved[S] && !moved[T] && rstore == S && mstate != M_MIGRATED && mstate != M_CUTOVER && rmst == R_NONE) ||
           (moved[S] && !moved[T] && rstore == T && mstate == M_MIGRATED && rmst != R_CUTOVER && rmst != R_MIGRATED) ||
           (!moved[S] && moved[T] && rstore == S && rstate == NORMAL && rmst == R_MIGRATED))
#else
    assert(acked == (1 << WRITERS) - 1);            /* 5: every writer acknowledged */
    assert(rstate != CUTOVER_PAUSED);               /* 5: every gate open */
    assert(!moved[rstore]);                         /* 1: routing names a writable store */
    assert(ALL_ACKED_IN(rstore));                   /* 2: nothing acknowledged is lost */
#ifndef NO_INV8
    assert(topen == moved[S]);                      /* 8: the target open iff the tenant moved */
#endif
    /* 5: all or nothing */
    assert((moved[S] && rstore == T && rstate == NORMAL && mstate == M_MIGRATED) ||
           (!moved[S] && rstore == S && mstate != M_MIGRATED && mstate != M_CUTOVER))
#endif
}
