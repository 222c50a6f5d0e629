/*
 * delivery.pml — the chatbridge delivery protocol (docs/delivery.md), for spin.
 *
 * One session; the platform delivers E messages in order, each DELIVERIES times (the
 * dedupe key keeps one entry per message). Two workers read and claim the entries, take
 * the session lock (head of the queue only), journal each piece (fenced by the lock)
 * before the platform shows it, replay a journal instead of asking again, and acknowledge
 * (releasing the lock, bumping the fence). Chaos: up to CRASHES crashes of any worker at
 * any step (it comes back as a new consumer with an empty memory: its claims and lock are
 * released by expiry), and up to STALLS stalls (a live worker paused past
 * BRIDGE_CLAIM_IDLE_S: its entries may be claimed and its lock may expire while it goes
 * on, unaware, until its keep loop or a fenced write tells it), and up to REFUSALS sends the
 * IM refuses (after the outbox's retries: nothing shows, the worker lets the entry go). Time is
 * abstracted: an expiry or an idle claim may happen at any moment the protocol allows it.
 *
 * Past MAX_ATTEMPTS (Worker._out_of_attempts) an entry is dead-lettered with its notice,
 * unless its journal says the answer was delivered (complete, every piece confirmed: its ack
 * was lost), or is complete and was never refused by the IM (`send_refused`, set when the IM
 * refuses a piece's first send, cleared when a replay sends the pieces again): those are
 * replayed, without a notice, the latter on NOTICE_TRIES deliveries past the limit at most.
 *
 * Each step on Redis is one atomic Lua script or command in the implementation, and one
 * atomic block here. (The webhook's put script may also make the first read and the start
 * of what it stored: that is the put, a read and the lock step with nothing in between,
 * one of the schedules checked here.) The platform shows the first piece sent under a message_id, as Yach
 * does for app-API sends.
 *
 * Timing assumption (every lease has one): a live process does not pause for longer than
 * BRIDGE_CLAIM_IDLE_S between a fenced check of its lock (journalling a piece; the renew
 * before a replayed piece) and handing that piece to the platform — an in-memory step. A
 * stall may happen anywhere else (`critical` marks the window). Without the assumption no
 * lease can stop a paused process's late send; with it, the fences suffice.
 *
 * Safety (assertions, checked exhaustively):
 *   ORDER      nothing of a message shows after anything of a later message of the session;
 *   ONE_ANSWER every piece shown for a message comes from one upstream run (a piece is
 *              never shown twice, nor contradicted by a second answer), and a cut-off
 *              notice never follows a complete answer;
 *   ANSWERED   at the end every stored message is acknowledged, and was answered: its
 *              whole answer, or what was sent of it and the cut-off notice, or the
 *              dead-letter notice after MAX_ATTEMPTS started turns; the dead-letter notice
 *              never comes under a whole answer whose journal is complete (before the
 *              notice's tries are spent), nor anything of the answer after it;
 *   and no deadlock (spin's invalid end states).
 *
 *   spin -a delivery.pml && gcc -O2 -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m100000
 *   (and with `spin -DREFUSALS=1 -DCRASHES=0 -a …`: a refusal and a stall)
 *
 * Variants that must FAIL (the model has teeth): -DNO_FENCE (a piece is journalled without
 * checking the lock), -DNO_JOURNAL (a redelivered turn asks the upstream again), -DNO_HEAD
 * (any queued message may take the lock), -DACK_FIRST (acknowledge before the pieces),
 * -DNOTICE_UNFENCED (a replay sends its cut-off notice without journalling it under the
 * lock: the race this model found in the implementation, now fixed), -DDEAD_LETTER_COMPLETE
 * (past the limit, a complete journal is dead-lettered too), -DSTICKY_REFUSAL with
 * -DREFUSALS=1 -DCRASHES=0 (every refused send marks the journal, and nothing clears the
 * mark: the code as this model found it).
 */

/* Bounds. The defaults are checked by tests/unit/test_delivery_model.py in seconds (a crash
 * makes a replay, a crash and a stall a dead letter, or a replay past the limit), and so are
 * -DREFUSALS=1 -DCRASHES=0; -DCRASHES=2, or a refusal with the crash, take minutes
 * (docs/delivery.md gives the numbers). */
#define W 2
#define E 2
#define P 2
#ifndef MAX_ATTEMPTS
#define MAX_ATTEMPTS 2
#endif
#ifndef CRASHES
#define CRASHES 1
#endif
#ifndef STALLS
#define STALLS 1
#endif
#ifndef DELIVERIES
#define DELIVERIES 2
#endif
#ifndef REFUSALS
#define REFUSALS 0
#endif
/* `_notice_tries`: on how many deliveries past the limit a dead-letter notice is tried, and so
 * a complete journal that the IM never refused is replayed: MAX_ATTEMPTS, 3 at least */
#define NOTICE_TRIES (MAX_ATTEMPTS > 3 -> MAX_ATTEMPTS : 3)

/* The platform: dedupe keys, and what the group sees. */
bool dedupe[E];
byte shown[E * P];     /* the upstream run whose piece (e, i) shows; 0: nothing yet */
bool cut_notice[E];
bool dead_notice[E];

/* Redis */
bool stored[E];
bool acked[E];
byte owner_w[E];       /* the consumer whose pending list holds the entry: worker 1..W, 0 none */
byte owner_i[E];       /* … and which incarnation of it */
bool held[E];          /* its owner keeps it claimed (XCLAIM JUSTID every claim_idle/3) */
byte lock_token;       /* the session lock: 0 free */
byte lock_w;
byte lock_i;
byte fence;
byte attempts[E];      /* turns started: counted when the lock is taken */
byte journalled[E];
byte journal_run[E];
bool complete[E];      /* the journal is marked complete: by the last piece's journal write
                          when the end is known by then, else by the record after its send */
bool cut_journalled[E]; /* the cut-off notice is journalled (as the journal's last piece) */
bool confirmed[E * P]; /* s:i — the platform confirmed the send of piece (e, i) */
bool send_refused[E];  /* the IM refused the first send of a piece (after the outbox's retries) */
byte refusals;

/* The world */
byte inc[W + 2];       /* one spare: gcc cannot see that owner_w is never 0 there */
bool stalled[W + 1];
bool critical[W + 1];  /* between a fenced check of the lock and the send it allows */
bool crash_req[W + 1];
byte crashes;
byte stalls;
byte runs;

#define ALL_ACKED   (acked[0] && acked[1])
#define DEAD(e)     (owner_i[e] != inc[owner_w[e]])
/* XREADGROUP ">": the first entry not yet delivered to anyone */
#define READABLE(e) (stored[e] && !acked[e] && owner_w[e] == 0 && (e == 0 || owner_w[0] != 0))
/* XAUTOCLAIM: idle past BRIDGE_CLAIM_IDLE_S — its consumer died, or does not keep it, or stalled */
#define CLAIMABLE(e) (stored[e] && !acked[e] && owner_w[e] != 0 && \
                      (DEAD(e) || !held[e] || (stalled[owner_w[e]] && owner_w[e] != w)))
#ifdef NO_HEAD
#define HEAD(e)     (stored[e] && !acked[e])
#else
#define HEAD(e)     (stored[e] && !acked[e] && (e == 0 || acked[0]))
#endif
#define LOST        (owner_w[e] != w || owner_i[e] != me || acked[e])
#define LATER_SHOWN(e) (e == 0 && (shown[2] != 0 || shown[3] != 0 || cut_notice[1] || dead_notice[1]))
#define ONE_RUN(e)  (shown[e * P] == 0 || shown[e * P + 1] == 0 || shown[e * P] == shown[e * P + 1])
#define FULL(e)     (shown[e * P] != 0 && shown[e * P + 1] != 0)
#define SOME(e)     (shown[e * P] != 0 || shown[e * P + 1] != 0)
/* The journal's `complete` field: the record or the last piece's journal write sets it, and
 * so does journalling the cut-off notice (the journal's last piece). */
#define JCOMPLETE(e) (complete[e] || cut_journalled[e])
/* Journal.delivered: complete, and every journalled piece confirmed sent (the cut-off
 * notice's own mark is not modelled: a journal that holds it never counts as delivered, and
 * its replay sends it again, under its message_id) */
#define DELIVERED(e) (complete[e] && !cut_journalled[e] && confirmed[e * P] && confirmed[e * P + 1])
/* Past the limit, a complete journal the IM never refused is replayed without a notice (its
 * process may have died as its last sends showed), on NOTICE_TRIES deliveries at most. */
#ifdef DEAD_LETTER_COMPLETE
#define RESENDABLE(e) (false)
#else
#define RESENDABLE(e) (JCOMPLETE(e) && !send_refused[e] && attempts[e] <= MAX_ATTEMPTS + NOTICE_TRIES)
#endif
/* Worker._out_of_attempts */
#define OUT_OF_ATTEMPTS(e) (attempts[e] > MAX_ATTEMPTS && !DELIVERED(e) && !RESENDABLE(e))

/* The lock is ours: the same token, or it expired and nobody took the session since. */
#ifdef NO_FENCE
#define HOLDS (true)
#define NOTICE_UNFENCED
#else
#define HOLDS (lock_token == token || (lock_token == 0 && fence == token))
#endif

/* The platform shows a piece under its message_id (entry, index): once. */
inline display(e, i, r) {
  if
  :: shown[e * P + i] == 0 ->
     assert(!LATER_SHOWN(e));   /* ORDER */
     assert(!dead_notice[e]);   /* ANSWERED: nothing of an answer after its dead letter */
     shown[e * P + i] = r
  :: else -> skip
  fi;
  assert(ONE_RUN(e))            /* ONE_ANSWER */
}

/* Hand a piece to the platform: it shows it, or (REFUSALS times at most) refuses it after the
 * outbox's retries — nothing shows, and the worker lets the entry go (SendError). `fresh`: the
 * piece's first send, by the run that journalled it: its refusal marks the journal
 * `send_refused` (fenced, as a journal write), for the piece did not show. A replay's resend
 * may be of a piece an earlier try showed (its process died before the mark): its refusal
 * proves nothing, and marks nothing. */
inline send(e, i, r, fresh) {
  if
  :: atomic { display(e, i, r); critical[w] = false }
  :: atomic { refusals < REFUSALS -> refusals++; critical[w] = false };
#ifdef STICKY_REFUSAL
     atomic { send_refused[e] = true };
#else
     if
     :: fresh -> atomic { if :: HOLDS -> retake(); send_refused[e] = true :: else -> skip fi }
     :: else -> skip
     fi;
#endif
     goto gone
  fi
}

inline notice_cut(e) {
  if
  :: !cut_notice[e] -> assert(!LATER_SHOWN(e)); assert(!complete[e]); cut_notice[e] = true
  :: else -> skip
  fi
}

/* Take the lock back if it merely expired (nobody took the session since). */
inline retake() {
  if
  :: lock_token == 0 -> lock_token = token; lock_w = w; lock_i = inc[w]
  :: else -> skip
  fi
}

/* The acknowledge script: XACK + XDEL + LREM queue + DEL journal + release our lock;
 * refused (nothing done) when another consumer has claimed the entry: it is left to that one. */
inline ack(e) {
  if
  :: owner_w[e] == w && owner_i[e] == me ->
     acked[e] = true;
     held[e] = false;
     if
     :: lock_token == token -> lock_token = 0; fence++
     :: else -> skip
     fi
  :: else -> skip
  fi
}

/* The record script, after the answer's last piece was sent: the session saved and the
 * journal marked complete, fenced by the lock like a journal write (refused, it does nothing:
 * the turn is the new holder's; the worker goes on to its ack, which the owner check guards). */
inline record(e) {
  if
  :: HOLDS -> retake(); complete[e] = true
  :: else -> skip
  fi
}

proctype Platform() {
  byte m = 0;
  byte d;
  do
  :: m < E ->
     d = 0;
     do
     :: d < DELIVERIES ->
        atomic { if :: !dedupe[m] -> dedupe[m] = true; stored[m] = true :: else -> skip fi };
        d++
     :: else -> break
     od;
     m++
  :: else -> break
  od
}

proctype Chaos() {
  do
  :: crashes < CRASHES -> atomic { crashes++; if :: crash_req[1] = true :: crash_req[2] = true fi }
  :: stalls < STALLS -> atomic { stalls++; if :: stalled[1] = true :: stalled[2] = true fi }
  :: break
  od
}

proctype Worker(byte w) {
  byte e;
  byte i;
  byte token;
  byte answer_run;
  byte me;
  do
  :: ALL_ACKED -> break
  :: else ->
     {
       /* take an entry: a first read, or a claim */
       if
       :: atomic { READABLE(0) || CLAIMABLE(0) ->
            e = 0; owner_w[0] = w; owner_i[0] = inc[w]; held[0] = true; me = inc[w] }
       :: atomic { READABLE(1) || CLAIMABLE(1) ->
            e = 1; owner_w[1] = w; owner_i[1] = inc[w]; held[1] = true; me = inc[w] }
       :: ALL_ACKED -> goto done
       fi;
       /* wait for the head of the session queue and the lock (waiting is not an attempt) */
       do
       :: atomic { HEAD(e) && lock_token == 0 ->
            fence++; token = fence; lock_token = token; lock_w = w; lock_i = inc[w];
            attempts[e]++; break }
       :: atomic { lock_token != 0 &&
                   (lock_i != inc[lock_w] || (stalled[lock_w] && !critical[lock_w])) ->
            lock_token = 0 }   /* the lock of a dead (or stalled) holder expires */
       :: LOST -> goto gone    /* the keep loop: claimed elsewhere, or acknowledged */
       od;
       if
       :: OUT_OF_ATTEMPTS(e) ->
          atomic {
            if
            :: !dead_notice[e] ->
               assert(!LATER_SHOWN(e));
               /* ANSWERED: no "dropped, please resend" under a whole answer that the journal
                * says complete — before the notice's tries are spent (a replay that never ends
                * is cut short there). A whole answer whose journal is not complete (its worker
                * gone between the last send and the record) cannot be told from one cut
                * short: past the limit it may get this notice, as within it the cut-off one. */
               assert(!(FULL(e) && JCOMPLETE(e)) || attempts[e] > MAX_ATTEMPTS + NOTICE_TRIES);
               dead_notice[e] = true
            :: else -> skip
            fi;
            ack(e)             /* XADD …:dead and the acknowledgement: one script */
          };
          goto done
       :: else -> skip
       fi;
#ifdef ACK_FIRST
       atomic { ack(e) };
#endif
#ifdef NO_JOURNAL
       if :: true ->
#else
       if
       :: journalled[e] > 0 ->
          /* replay: the unconfirmed journalled pieces under their message_ids, then the notice */
#ifndef STICKY_REFUSAL
          if
          :: send_refused[e] ->                 /* from here on the pieces may show: unmarked */
             atomic { if :: HOLDS -> retake(); send_refused[e] = false :: else -> goto gone fi }
          :: else -> skip
          fi;
#endif
          i = 0;
          do
          :: i < journalled[e] && confirmed[e * P + i] -> i++
          :: i < journalled[e] && !confirmed[e * P + i] ->
             atomic {                                        /* the lock, checked… */
               if
               :: HOLDS -> retake(); critical[w] = true
               :: else -> goto gone
               fi
             };
             send(e, i, journal_run[e], false);              /* …then sent */
             atomic { confirmed[e * P + i] = true };         /* s:i, unfenced */
             i++
          :: else -> break
          od;
          if
          :: cut_journalled[e] -> atomic { notice_cut(e) }     /* resent under its id */
          :: !complete[e] && !cut_journalled[e] ->
#ifndef NOTICE_UNFENCED
             atomic {                                        /* journalled first, fenced */
               if
               :: HOLDS -> retake(); cut_journalled[e] = true; critical[w] = true
               :: else -> goto gone
               fi
             };
#endif
             atomic { notice_cut(e); critical[w] = false }
          :: else -> skip
          fi;
          atomic { record(e) }               /* the replayed answer, recorded */
       :: else ->
#endif
          atomic { runs++; answer_run = runs };   /* ask the upstream */
          i = 0;
          do
          :: i < P ->
             if
             :: LOST -> goto gone            /* the keep loop noticed, at some point… */
             :: true -> skip                 /* …or not yet */
             fi;
             atomic {                        /* journal the piece, fenced by the lock… */
               if                            /* …confirming the previous one (unfenced, as the app API) */
               :: i > 0 -> confirmed[e * P + i - 1] = true
               :: else -> skip
               fi;
               if
               :: HOLDS ->
                  retake(); critical[w] = true;
                  journalled[e] = i + 1; journal_run[e] = answer_run;
                  if
                  :: i == P - 1 -> complete[e] = true   /* the end already queued behind it */
                  :: true -> skip                       /* or not yet: the record marks it */
                  fi
               :: else -> goto gone          /* LockLost: another turn owns the answer */
               fi
             };
             send(e, i, answer_run, true);   /* a crash replays it */
             i++
          :: else -> break
          od;
          atomic { confirmed[e * P + P - 1] = true; record(e) }   /* the last piece's mark
                                               rides with the record, unfenced; a crash before
                                               it: replayed, with the notice unless complete */
       fi;
       atomic { ack(e) };                    /* record, then XACK: shielded */
       goto done;
gone:
       atomic {                              /* given up: the lock let go, if still ours */
         critical[w] = false;
         if :: owner_w[e] == w && owner_i[e] == me -> held[e] = false :: else -> skip fi;
         if :: token != 0 && lock_token == token -> lock_token = 0; fence++ :: else -> skip fi
       };
done:
       skip
     } unless {
       atomic { crash_req[w] -> crash_req[w] = false; critical[w] = false; inc[w]++ }   /* a new consumer, no memory */
     }
  od
}

init {
  atomic {
    run Platform();
    run Chaos();
    run Worker(1);
    run Worker(2)
  };
  (_nr_pr == 1);
  byte e = 0;
  do
  :: e < E ->
     assert(acked[e]);                                                     /* ANSWERED */
     assert(FULL(e) || (SOME(e) && cut_notice[e]) || dead_notice[e]);
     assert(!dead_notice[e] || attempts[e] > MAX_ATTEMPTS);
     e++
  :: else -> break
  od
}
